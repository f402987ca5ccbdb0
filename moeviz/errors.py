"""Errors that users see: each message says what was wrong and what to do about it."""


class MoevizError(Exception):
    """Base class; the CLI prints these without a traceback and exits 2."""


class StoreNotFoundError(MoevizError, FileNotFoundError):
    pass


class SchemaVersionError(MoevizError):
    pass


class StoreError(MoevizError):
    pass


class StaleStoreError(StoreError):
    """A file this connection read was removed since it was opened (a compaction folded it): open the store again."""
