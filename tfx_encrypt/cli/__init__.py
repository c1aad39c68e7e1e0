"""The `tfx-encrypt` command line: thin wrappers over the Python API.

Every failure becomes one line on stderr (`tfx-encrypt: error: ...`) and a
non-zero exit code taken from the error class (see tfx_encrypt.errors).
The group and its error handling are in `_group`; shared options, each
defined once, in `_options`; each other module holds the commands of one
area and registers them on the group when imported here.
"""

from tfx_encrypt.cli._group import main
from tfx_encrypt.cli import _audit  # noqa: F401  pylint: disable=unused-import
from tfx_encrypt.cli import _keys  # noqa: F401  pylint: disable=unused-import
from tfx_encrypt.cli import _lineage  # noqa: F401  pylint: disable=unused-import
from tfx_encrypt.cli import _packages  # noqa: F401  pylint: disable=unused-import
from tfx_encrypt.cli import _registry  # noqa: F401  pylint: disable=unused-import
from tfx_encrypt.cli import _serving  # noqa: F401  pylint: disable=unused-import
from tfx_encrypt.cli._group import _Group  # noqa: F401  pylint: disable=unused-import

__all__ = ['main']

if __name__ == '__main__':
  main()  # pylint: disable=no-value-for-parameter
