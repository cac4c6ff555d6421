"""Stored responses for /v1/responses: SQLite by default, PostgreSQL by URL."""

from aisandbox.store.base import ResponseStore, StoredResponse, StoreUnavailable
from aisandbox.store.sqlite import SQLiteResponseStore

__all__ = ["open_store", "ResponseStore", "SQLiteResponseStore", "StoreUnavailable", "StoredResponse"]


def open_store(url: str | None, data_dir, retention_days: int = 30) -> ResponseStore:
    """Open the configured store and delete rows past the retention period."""
    import time
    from pathlib import Path

    store: ResponseStore
    if url and url.startswith(("postgresql://", "postgres://")):
        from aisandbox.store.postgres import PostgresResponseStore

        store = PostgresResponseStore(url)
    elif url:
        raise StoreUnavailable(f"unsupported response_store_url scheme: {url.split(':', 1)[0]}")
    else:
        store = SQLiteResponseStore(Path(data_dir) / "responses.db")
    if retention_days > 0:
        store.purge_older_than(int(time.time()) - retention_days * 86400)
    return store
