"""Stored responses for /v1/responses: SQLite by default, PostgreSQL by URL (later)."""

from aisandbox.store.base import ResponseStore, StoredResponse, StoreUnavailable
from aisandbox.store.sqlite import SQLiteResponseStore

__all__ = ["ResponseStore", "SQLiteResponseStore", "StoreUnavailable", "StoredResponse"]
