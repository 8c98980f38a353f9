"""Where bytes live: local and S3 storage with atomic writes (``storage.py``), what SRC names (``sources.py``: globs,
braces, paged listings) and the one lease mechanism on top of them (``leases.py``: DST leases, nightly claims)."""
