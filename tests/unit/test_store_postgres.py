"""The PostgreSQL response store against a real throwaway cluster (Debian's `postgresql`: initdb + pg_ctl).

Skipped only where the server binaries are missing and CI is not set; `.ci/run` and `make test` install them.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from aisandbox.store import StoredResponse, open_store
from tests.conftest import free_port


def _bin(name: str) -> str | None:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    return found[-1] or None


@pytest.fixture(scope="module")
def pg_url() -> Iterator[str]:
    initdb, pg_ctl = _bin("initdb"), _bin("pg_ctl")
    if initdb is None or pg_ctl is None:
        if os.environ.get("CI") == "true":
            pytest.fail("PostgreSQL server binaries missing under CI (.ci/run installs Debian's postgresql)")
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not installed: `make postgres`")
    # Outside pytest's own temp folder, which only its user may enter: the cluster may run as another user.
    root = Path(tempfile.mkdtemp(prefix="aisandbox-pg-"))
    data = root / "data"
    run_as: list[str] = []
    if os.geteuid() == 0:  # initdb refuses root: run the cluster as the postgres user
        shutil.chown(root, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    subprocess.run([*run_as, initdb, "-D", str(data), "-A", "trust", "-U", "postgres"], check=True, capture_output=True)
    opts = f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off"
    log = root / "pg.log"
    subprocess.run([*run_as, pg_ctl, "-D", str(data), "-o", opts, "-l", str(log), "-w", "start"], check=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*run_as, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], check=False)
        shutil.rmtree(root, ignore_errors=True)


def _resp(rid: str, created: int) -> StoredResponse:
    return StoredResponse(rid, created, {"id": rid, "object": "response", "output": []}, [{"type": "message"}])


def test_postgres_round_trip_shared_by_two_workers(pg_url: str, tmp_path: Path) -> None:
    a = open_store(pg_url, tmp_path)
    b = open_store(pg_url, tmp_path)  # a second worker (or replica): the schema migrates once
    a.put(_resp("resp_1", 100))
    assert b.get("resp_1") == _resp("resp_1", 100)
    assert b.get("missing") is None
    assert b.delete("resp_1") is True and a.get("resp_1") is None and a.delete("resp_1") is False
    versions = a._db.execute("SELECT COUNT(*) FROM schema_version").fetchone()[0]  # type: ignore[attr-defined]
    assert versions == 1
    a.close()
    b.close()


def test_postgres_retention(pg_url: str, tmp_path: Path) -> None:
    store = open_store(pg_url, tmp_path)
    now = int(time.time())
    store.put(_resp("resp_old", now - 40 * 86400))
    store.put(_resp("resp_new", now))
    store.close()
    store = open_store(pg_url, tmp_path, retention_days=30)
    assert store.get("resp_old") is None and store.get("resp_new") is not None
    store.close()


def test_an_unreachable_database_is_store_unavailable(tmp_path: Path) -> None:
    from aisandbox.errors import StoreUnavailable

    with pytest.raises(StoreUnavailable):
        open_store(f"postgresql://postgres@127.0.0.1:{free_port()}/postgres", tmp_path)
