"""PostgreSQL response store, for replicas behind a load balancer (`response_store_url=postgresql://...`).

The same interface and schema as the SQLite store, with psycopg 3: one autocommit connection per worker, guarded by
a lock (a response is one row written once and read a few times); the schema migrates under an advisory lock, so
replicas starting together migrate once.
"""

from __future__ import annotations

import json
import threading
from typing import Any

from aisandbox.store.base import StoredResponse, StoreUnavailable

SCHEMA_VERSION = 1

_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE TABLE responses (id TEXT PRIMARY KEY, created_at BIGINT NOT NULL,"
        " response JSONB NOT NULL, input_items JSONB NOT NULL)",
        "CREATE INDEX responses_created_at ON responses (created_at)",
    ),
}
_LOCK_KEY = 0x61697362  # "aisb": the advisory lock migrations hold


class PostgresResponseStore:
    def __init__(self, url: str) -> None:
        try:
            import psycopg
        except ImportError as exc:
            raise StoreUnavailable("PostgreSQL response store needs the psycopg package") from exc
        self._errors: tuple[type[BaseException], ...] = (psycopg.Error,)
        try:
            self._db: Any = psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            raise StoreUnavailable(f"cannot connect to the response store: {exc}") from exc
        self._lock = threading.Lock()
        self._migrate()

    def _migrate(self) -> None:
        with self._lock, self._db.transaction():
            self._db.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
            self._db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            current = self._db.execute("SELECT MAX(version) FROM schema_version").fetchone()[0] or 0
            for version in sorted(v for v in _MIGRATIONS if v > current):
                for statement in _MIGRATIONS[version]:
                    self._db.execute(statement)
                self._db.execute("INSERT INTO schema_version (version) VALUES (%s)", (version,))

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> Any:
        try:
            with self._lock:
                return self._db.execute(sql, args)
        except self._errors as exc:
            raise StoreUnavailable(f"response store error: {exc}") from exc

    def put(self, stored: StoredResponse) -> None:
        self._run(
            "INSERT INTO responses (id, created_at, response, input_items) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (id) DO UPDATE SET response = EXCLUDED.response, input_items = EXCLUDED.input_items",
            (stored.id, stored.created_at, json.dumps(stored.response), json.dumps(stored.input_items)),
        )

    def get(self, response_id: str) -> StoredResponse | None:
        row = self._run(
            "SELECT id, created_at, response, input_items FROM responses WHERE id = %s", (response_id,)
        ).fetchone()
        if row is None:
            return None
        return StoredResponse(row[0], int(row[1]), row[2], row[3])

    def delete(self, response_id: str) -> bool:
        return bool(self._run("DELETE FROM responses WHERE id = %s", (response_id,)).rowcount > 0)

    def purge_older_than(self, cutoff: int) -> int:
        return int(self._run("DELETE FROM responses WHERE created_at < %s", (cutoff,)).rowcount)

    def close(self) -> None:
        with self._lock:
            self._db.close()
