"""The state database: where llproxy keeps API keys and usage records, and how it is opened.

One file, `llproxy.db`, in the state directory. It is opened the same way by whoever
comes first (a `keys` command, the usage writer of a daemon), so it is private to its
owner whoever created it: the directory 0700, the file 0600.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Mapping
from pathlib import Path

DATABASE = "llproxy.db"


def state_dir(explicit: str | None = None, environ: Mapping[str, str] | None = None) -> Path:
    """--state-dir, $LLPROXY_STATE_DIR, systemd's $STATE_DIRECTORY, else XDG state home."""
    env = os.environ if environ is None else environ
    for candidate in (explicit, env.get("LLPROXY_STATE_DIR")):
        if candidate:
            return Path(candidate)
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    home = Path(env.get("HOME") or Path.home())
    return Path(env.get("XDG_STATE_HOME") or home / ".local" / "state") / "llproxy"


def open_database(directory: Path, *schema: str, threads: bool = False) -> sqlite3.Connection:
    """A connection in autocommit mode with WAL (readers never wait on the writer), after
    creating the schema statements given. `threads` allows use from a worker thread."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = directory / DATABASE
    path.touch(mode=0o600, exist_ok=True)
    with contextlib.suppress(OSError):
        os.chmod(path, 0o600)  # also when an older llproxy made it with the umask's mode
    db = sqlite3.connect(path, isolation_level=None, timeout=10.0, check_same_thread=not threads)
    db.execute("PRAGMA journal_mode=WAL")
    for statement in schema:
        db.execute(statement)
    return db


def file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of a file, None when it is missing: tells a file made anew at the
    same path from the one a connection has open."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return stat.st_dev, stat.st_ino
