"""Filesystem edges: atomic publication, owned temporary siblings, the
overwrite policy, and tree removal that cannot fail half-way
(docs/SECURITY.md). A short public face over:

* :mod:`._publish`: renameat2 NOREPLACE/EXCHANGE, `check_output` and what
  `--force` may replace (§1);
* :mod:`._temps`: temporary siblings, their lock files, the sweep, removal
  at any depth (§2);
* :mod:`._io`: exact reads and writes, `hash_file`, `tree_size`, and
  unlinked plaintext files (`UnlinkedFiles`).
"""

from tfx_encrypt._fsutil._io import (  # noqa: F401
    UnlinkedFiles, close_fd, fsync_dir, hash_file, read_into_exact, tree_size,
    write_all)
from tfx_encrypt._fsutil._io import _reserve_fds  # noqa: F401  pylint: disable=unused-import
from tfx_encrypt._fsutil._temps import _LIVE  # noqa: F401  pylint: disable=unused-import
from tfx_encrypt._fsutil._publish import (  # noqa: F401
    DECRYPTED_XATTR, check_output, exists_error, is_decrypted_tree,
    mark_decrypted, publish, replace_checked, unreplaceable_reason)
from tfx_encrypt._fsutil._temps import (  # noqa: F401
    TEMP_NAME_RE, is_temp_name, public_path, remove_all_temps, remove_tree,
    sweep, temp_sibling)
