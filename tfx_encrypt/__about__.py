"""Version of the tfx-encrypt distribution.

Kept in its own module so that setup.py can read it with a regex, without
importing the package (and so without importing anything the package needs).
"""

__version__ = '0.1.0'
