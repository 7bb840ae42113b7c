"""The pretrained-weight cache, by its old name: re-exports the three modules that now hold it.

- resnetcli.store: folder, records, locks, partial files, the one verified-install path;
- resnetcli.download: HTTP downloads (capped, mirrorable, offline-aware) and imports;
- resnetcli.inventory: listing, verifying and removing.

Kept so that `resnetcli.cache.X` callers (the factory's `state_dict_for`, `list`'s cached column,
the CLI's settings) keep working; new code imports the module that holds the function.
"""

from __future__ import annotations

from resnetcli.download import (  # noqa: F401
    DEFAULT_MAX_DOWNLOAD,
    DEFAULT_TIMEOUT,
    CacheSettings,
    ProgressCallback,
    download,
    file_name_of,
    import_file,
    parse_sha256,
    size_of_mib,
)
from resnetcli.inventory import (  # noqa: F401
    Listed,
    Verification,
    cached_file,
    cached_files,
    describe,
    listing,
    remove,
    remove_leftovers,
    remove_partials,
    stale_partials,
    verify,
)
from resnetcli.store import (  # noqa: F401
    PARTIAL_SUFFIX,
    RECORD_DIR,
    CachedFile,
    check_cached_file,
    checkpoint_dir,
    hash_prefix_of,
    hub_dir,
    read_record,
    sha256_of,
    write_record,
)
