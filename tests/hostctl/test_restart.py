"""`hostctl restart` is zero-downtime like a deploy's changed-program path: under a steady tcp-echo load (one
client, bounded in count and time) the port is served throughout while supervisord replaces the program.

Measured here: without the bridge ~16,000 requests are refused during a restart; with the bridge and
net.ipv4.tcp_migrate_req (hostctl turns it on) none is refused or reset, and since the services' drain keeps
a just-accepted connection open until its request is answered (services.drivers.lifecycle), none fails.
"""

from __future__ import annotations

import threading
import time

from monitoring.collect import supervisor
from services import client
from tests.hostctl.conftest import Host

MAX_REQUESTS = 20000


def test_restart_under_load_keeps_the_port_served(host: Host) -> None:
    port = host.ports["tcp-echo"]
    counts = {"ok": 0, "failed": 0}
    errors: list[str] = []
    stop = threading.Event()

    def load() -> None:
        deadline = time.monotonic() + 60
        while not stop.is_set() and sum(counts.values()) < MAX_REQUESTS and time.monotonic() < deadline:
            try:
                reply = client.tcp_echo("127.0.0.1", port, b"zero downtime", 2.0)
                counts["ok" if reply == b"ZERO DOWNTIME" else "failed"] += 1
            except Exception as exc:  # every failure counts, whatever it is
                counts["failed"] += 1
                errors.append(repr(exc))

    before = {i["name"]: i["pid"] for i in supervisor.all_process_info(host.socket)}
    thread = threading.Thread(target=load, daemon=True)
    thread.start()
    try:
        while counts["ok"] < 50:  # the load runs before the restart begins
            assert thread.is_alive(), errors[-3:]
            time.sleep(0.01)
        code, doc = host.hostctl("restart", "--conf", str(host.conf), "sockops-tcp-echo")
        served = counts["ok"]
        while counts["ok"] < served + 50 and thread.is_alive():  # and after it ended
            time.sleep(0.01)
    finally:
        stop.set()
        thread.join(timeout=30)
    assert code == 0, doc
    assert doc["restarted"] == ["sockops-tcp-echo"]
    after = {i["name"]: i["pid"] for i in supervisor.all_process_info(host.socket)}
    assert after["sockops-tcp-echo"] != before["sockops-tcp-echo"]
    assert after["sockops-udp-echo"] == before["sockops-udp-echo"]
    assert not [e for e in errors if "refused" in e or "reset" in e], errors[:3]  # the bridge's part: none
    assert counts["failed"] == 0, (counts, errors[:3])
    host.wait_running()
