"""Stored responses for /v1/responses: SQLite by default, PostgreSQL by URL (later)."""

from aisandbox.store.base import ResponseStore, StoredResponse, StoreUnavailable
from aisandbox.store.sqlite import SQLiteResponseStore

__all__ = ["open_store", "ResponseStore", "SQLiteResponseStore", "StoreUnavailable", "StoredResponse"]


def open_store(url: str | None, data_dir, retention_days: int = 30) -> ResponseStore:
    """Open the configured store and delete rows past the retention period."""
    import time
    from pathlib import Path

    if url and url.startswith(("postgresql://", "postgres://")):
        raise StoreUnavailable("PostgreSQL response store is not implemented yet")
    store = SQLiteResponseStore(Path(data_dir) / "responses.db")
    if retention_days > 0:
        store.purge_older_than(int(time.time()) - retention_days * 86400)
    return store
