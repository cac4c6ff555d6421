"""SQLite response store (WAL), the default; one connection guarded by a lock."""

from __future__ import annotations

import json
import sqlite3
import threading
from pathlib import Path

from aisandbox.store.base import StoredResponse, StoreUnavailable

SCHEMA_VERSION = 1

_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        "CREATE TABLE responses (id TEXT PRIMARY KEY, created_at INTEGER NOT NULL,"
        " response TEXT NOT NULL, input_items TEXT NOT NULL)",
        "CREATE INDEX responses_created_at ON responses (created_at)",
    ),
}


class SQLiteResponseStore:
    def __init__(self, path: str | Path) -> None:
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._lock = threading.Lock()
            self._migrate()
        except (OSError, sqlite3.Error) as exc:
            raise StoreUnavailable(f"cannot open response store {path}: {exc}") from exc

    def _migrate(self) -> None:
        db = self._db
        db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
        row = db.execute("SELECT MAX(version) FROM schema_version").fetchone()
        current = row[0] or 0
        for version in sorted(v for v in _MIGRATIONS if v > current):
            db.execute("BEGIN")
            for statement in _MIGRATIONS[version]:
                db.execute(statement)
            db.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))
            db.execute("COMMIT")

    def _run(self, sql: str, args: tuple = ()) -> sqlite3.Cursor:
        try:
            with self._lock:
                return self._db.execute(sql, args)
        except sqlite3.Error as exc:
            raise StoreUnavailable(f"response store error: {exc}") from exc

    def put(self, stored: StoredResponse) -> None:
        self._run(
            "INSERT OR REPLACE INTO responses (id, created_at, response, input_items) VALUES (?, ?, ?, ?)",
            (stored.id, stored.created_at, json.dumps(stored.response), json.dumps(stored.input_items)),
        )

    def get(self, response_id: str) -> StoredResponse | None:
        row = self._run(
            "SELECT id, created_at, response, input_items FROM responses WHERE id = ?", (response_id,)
        ).fetchone()
        if row is None:
            return None
        return StoredResponse(row[0], row[1], json.loads(row[2]), json.loads(row[3]))

    def delete(self, response_id: str) -> bool:
        return self._run("DELETE FROM responses WHERE id = ?", (response_id,)).rowcount > 0

    def purge_older_than(self, cutoff: int) -> int:
        return self._run("DELETE FROM responses WHERE created_at < ?", (cutoff,)).rowcount

    def close(self) -> None:
        with self._lock:
            self._db.close()
