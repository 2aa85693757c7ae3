"""udp-echo's --stats-file: a live service over its rate (loopback, exemption off) counts every dropped
datagram in a group-readable JSON file that only grows, for every variant; prefork workers add up."""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from pathlib import Path

from services.stats import merge
from tests.services.test_hostile import answered

LIMITS = ("--udp-rate", "20", "--udp-burst", "20", "--udp-rate-exempt", "none")
SENT = 200
BOUND = 10.0  # seconds for the file to show what was sent (it is rewritten once a second)


def flood(address: tuple, count: int = SENT) -> int:
    """Send `count` datagrams from one source, then count the replies (until none for 0.5 s)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for i in range(count):
            sock.sendto(b"flood %d" % i, address)
        return answered(sock, count)


def dropped_when(path: Path, done, seconds: float = BOUND) -> dict:
    """The file's "dropped" once `done(dropped)` holds (bounded), else the last one seen."""
    deadline = time.monotonic() + seconds
    doc = {}
    while time.monotonic() < deadline:
        if path.exists():
            doc = json.loads(path.read_text())
            if done(doc["dropped"]):
                return doc["dropped"]
        time.sleep(0.1)
    raise AssertionError(f"{path}: {doc or 'never written'}")


def test_udp_echo_exports_its_drops(services, variant: str, tmp_path: Path) -> None:
    path = tmp_path / "run" / "udp-echo.json"
    path.parent.mkdir()
    svc = services("udp-echo", variant, *LIMITS, "--workers", "2", "--stats-file", str(path))
    # every reason is there from the start, at 0 (a counter exists before its first increment)
    start = dropped_when(path, lambda d: "rate-limited" in d)
    assert start == dict.fromkeys(
        ("privileged-source-port", "own-socket", "too-large", "rate-limited", "reply-not-sent"), 0
    )
    answered = flood(svc.address)
    assert 0 < answered < SENT
    # the kernel may drop a datagram before the service sees it; the service counts what it refused
    final = dropped_when(path, lambda d: d["rate-limited"] >= SENT - answered - 5)
    assert final["rate-limited"] <= SENT - answered
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert "Traceback" not in svc.log_text()
    # TERM: the counts stay in the file (the exporter reads a drained service's last word too)
    assert svc.stop() == 0
    assert json.loads(path.read_text())["dropped"]["rate-limited"] == final["rate-limited"]


def test_udp_echo_without_a_writable_stats_dir_keeps_serving(services, tmp_path: Path) -> None:
    svc = services("udp-echo", "selectors", "--stats-file", str(tmp_path / "missing" / "u.json"))
    assert flood(svc.address, 5) == 5
    assert "cannot write the stats file" in svc.log_text()


def test_merge_folds_dead_writers_and_never_goes_down() -> None:
    doc = merge(None, f"{os.getpid()}:1", {"rate-limited": 4}, alive=lambda pid: True)
    doc = merge(doc, "999999999:2", {"rate-limited": 3}, alive=lambda pid: pid == os.getpid())
    doc = merge(doc, "999999998:3", {"rate-limited": 1}, alive=lambda pid: pid == os.getpid())
    assert doc["dropped"] == {"rate-limited": 8}
    assert doc["retired"] == {"rate-limited": 3}
    assert sorted(doc["writers"]) == [f"{os.getpid()}:1", "999999998:3"]
