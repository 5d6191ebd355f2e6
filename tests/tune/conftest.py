"""Fixtures of the tuner tests: one warm measuring worker shared by the whole run (a fresh one costs ~2 s)."""
from __future__ import annotations

import pytest

from opgen.tune.measure import MeasureOptions, Measurer

FAST = MeasureOptions(timeout=2.0, setup_timeout=60.0, warmup=1, min_reps=3, min_time_s=0.01)


@pytest.fixture(scope="session")
def measurer():
    m = Measurer(FAST)
    yield m
    m.close()


# -- a throwaway PostgreSQL server (distributed tuning tests) -----------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def pg_url():
    """``postgresql+psycopg2://postgres@127.0.0.1:PORT/tuning`` of a server started for this test run in a temp
    dir (initdb as the postgres user when run as root; fsync off) and stopped after it. Skips when Debian's
    server binaries or psycopg2 are missing (``.ci/install`` installs both)."""
    import glob
    import os
    import shutil
    import subprocess
    import tempfile

    pytest.importorskip("psycopg2", reason="psycopg2 is not installed (pip install 'opgen[postgres]')")
    initdb = max(glob.glob("/usr/lib/postgresql/*/bin/initdb"), default=None)
    if initdb is None:
        pytest.skip("no PostgreSQL server binaries (/usr/lib/postgresql/*/bin/initdb); .ci/install installs them")
    bindir = os.path.dirname(initdb)
    root, port = tempfile.mkdtemp(prefix="opgen-pg-"), _free_port()
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if as_pg:
        shutil.chown(root, "postgres", "postgres")

    def run(*args: str) -> None:
        r = subprocess.run(as_pg + list(args), capture_output=True, text=True)
        if r.returncode:
            raise RuntimeError(f"{' '.join(args)} failed ({r.returncode}): {r.stderr.strip() or r.stdout.strip()}")

    run(f"{bindir}/initdb", "-D", f"{root}/data", "-A", "trust", "-U", "postgres", "--no-sync")
    run(f"{bindir}/pg_ctl", "-D", f"{root}/data", "-l", f"{root}/log", "-w", "-o",
        f"-c listen_addresses=127.0.0.1 -p {port} -k {root} -c fsync=off -c synchronous_commit=off", "start")
    try:
        run(f"{bindir}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "tuning")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/tuning"
    finally:
        subprocess.run(as_pg + [f"{bindir}/pg_ctl", "-D", f"{root}/data", "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
