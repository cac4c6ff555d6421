"""Response store: round trip, delete, retention purge, reopen keeps rows, migrations run once."""

from aisandbox.store import SQLiteResponseStore, StoredResponse


def _resp(rid: str, created: int) -> StoredResponse:
    return StoredResponse(rid, created, {"id": rid, "object": "response"}, [{"type": "message"}])


def test_sqlite_round_trip_delete_purge_reopen(tmp_path):
    path = tmp_path / "sub" / "responses.db"
    store = SQLiteResponseStore(path)
    store.put(_resp("resp_a", 100))
    store.put(_resp("resp_b", 200))
    assert store.get("resp_a") == _resp("resp_a", 100)
    assert store.get("missing") is None
    assert store.delete("resp_a") is True
    assert store.delete("resp_a") is False
    store.close()

    store = SQLiteResponseStore(path)  # reopen: schema not re-created, rows kept
    assert store.get("resp_b") == _resp("resp_b", 200)
    assert store.purge_older_than(201) == 1
    assert store.get("resp_b") is None
    assert store._db.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0] == 1
    store.close()
