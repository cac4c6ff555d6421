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


def test_open_store_applies_retention(tmp_path):
    import time

    from aisandbox.store import open_store

    store = open_store(None, tmp_path)
    store.put(_resp("resp_old", int(time.time()) - 31 * 86400))
    store.put(_resp("resp_new", int(time.time())))
    store.close()
    store = open_store(None, tmp_path, retention_days=30)
    assert store.get("resp_old") is None and store.get("resp_new") is not None
    store.close()


def test_settings_defaults():
    from aisandbox.settings import ServerSettings

    settings = ServerSettings()
    assert settings.response_store_url is None and settings.response_retention_days == 30
