"""Operations pieces: the sd_notify protocol on a real datagram socket, the systemd unit."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

from llproxy.process.sdnotify import Notifier

UNIT = Path(__file__).parent.parent / "scripts" / "llproxy.service"


def test_notifier_speaks_to_an_abstract_socket() -> None:
    name = f"llproxy-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(5)
        notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
        notifier.ready("serving 3 models")
        notifier.reloading()
        notifier.watchdog()
        notifier.stopping()
        notifier.close()
        messages = [server.recv(4096).decode() for _ in range(4)]
    assert messages[0] == "READY=1\nSTATUS=serving 3 models"
    assert messages[1].startswith("RELOADING=1\nMONOTONIC_USEC=")
    assert int(messages[1].split("=")[-1]) > 0
    assert messages[2:] == ["WATCHDOG=1", "STOPPING=1"]


def test_notifier_is_silent_without_systemd() -> None:
    notifier = Notifier({})
    assert not notifier.enabled and notifier.watchdog_interval is None
    notifier.ready()  # nothing to send to, and no error


def test_watchdog_interval_is_half_of_watchdog_sec_for_this_process() -> None:
    assert Notifier({"WATCHDOG_USEC": "30000000"}).watchdog_interval == 15.0
    mine = {"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": str(os.getpid())}
    assert Notifier(mine).watchdog_interval == 0.5
    assert Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_interval is None


def test_systemd_unit_is_valid_and_hardened(tmp_path: Path) -> None:
    text = UNIT.read_text()
    for directive in (
        "Type=notify",
        "DynamicUser=yes",
        "StateDirectory=llproxy",
        "ConfigurationDirectory=llproxy",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "RestrictAddressFamilies=",
        "RestartPreventExitStatus=78",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "WatchdogSec=",
    ):
        assert directive in text
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is needed (.ci/run installs systemd)"
    # verify wants ExecStart's binary to exist; point it at one that does.
    unit = tmp_path / "llproxy.service"
    unit.write_text(text.replace("/usr/local/bin/llproxy", shutil.which("true") or "/bin/true"))
    done = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip() == "", done.stderr
