"""A throwaway PostgreSQL cluster for tests: initdb and pg_ctl in a temporary directory,
on a free loopback port, as an unprivileged user when run as root (initdb refuses root).

Nothing is skipped: without PostgreSQL the tests that need it fail and say what to
install (scripts/system-deps installs it in CI).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from .conftest import free_port_block

USER = "llproxy"  # the cluster's superuser (a role, not a system user)


def postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    initdb = found[-1] if found else shutil.which("initdb")
    if initdb is None:
        pytest.fail(
            "PostgreSQL is needed for these tests (initdb, pg_ctl): "
            "sudo apt-get install postgresql (scripts/system-deps does it)",
            pytrace=False,
        )
    return Path(initdb).parent


class PgCluster:
    """One cluster of its own; `url(database)` for a client, stop()/start() to take it
    away and bring it back on the same port."""

    def __init__(self) -> None:
        self.bin = postgres_bin()
        self.root = Path(tempfile.mkdtemp(prefix="llproxy-pg-"))
        self.data = self.root / "data"
        self.port = free_port_block(1)
        # Root may not run a cluster: `nobody` does, in a directory of its own.
        self.run_as: list[str] = []
        if os.geteuid() == 0:
            nobody = pwd.getpwnam("nobody")
            os.chown(self.root, nobody.pw_uid, nobody.pw_gid)
            self.run_as = ["runuser", "-u", "nobody", "--"]
        self._pg("initdb", "-D", str(self.data), "-A", "trust", "-U", USER, "-E", "UTF8",
                 "--no-sync")  # fmt: skip
        self.start()

    def _pg(self, program: str, *args: str) -> None:
        done = subprocess.run(
            [*self.run_as, str(self.bin / program), *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=self.root,
        )
        assert done.returncode == 0, f"{program} failed:\n{done.stdout}\n{done.stderr}"

    def start(self) -> None:
        options = f"-h 127.0.0.1 -p {self.port} -k {self.root} -F -c max_connections=200"
        self._pg("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-o", options,
                 "-w", "-t", "30", "start")  # fmt: skip

    def stop(self) -> None:
        self._pg("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "-t", "30", "stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        self._pg("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", USER, name)
        return self.url(name)

    def destroy(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._pg("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
