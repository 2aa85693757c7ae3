"""udp-echo's drop counters reach Prometheus: a real supervisord runs udp-echo with --stats-file (rate 20/s,
loopback not exempt); a flood from loopback is counted by the service, and both `python -m monitoring
--prometheus` and a real exporter scrape show sockops_udp_dropped_datagrams_total with the file's figure."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from monitoring.collect import servicestats
from tests.monitoring.conftest import Supervised, run_monitoring, supervised_services
from tests.monitoring.test_exporter import exporter, samples, value
from tests.services.test_stats import dropped_when, flood

METRIC = "sockops_udp_dropped_datagrams_total"


@pytest.fixture(scope="module")
def udp_supervised(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Supervised]:
    """The monitoring tests' supervisord, udp-echo rate-limited on loopback and counting in run/."""
    d = tmp_path_factory.mktemp("servicestats")
    (d / "run").mkdir()
    flags = f" --udp-rate 20 --udp-burst 20 --udp-rate-exempt none --stats-file {d}/run/udp-echo.json"
    with supervised_services(d, udp_flags=flags) as sup:
        yield sup


def test_dropped_datagrams_reach_monitoring_and_the_exporter(udp_supervised: Supervised) -> None:
    stats = udp_supervised.dir / "run" / "udp-echo.json"
    answered = flood(("127.0.0.1", udp_supervised.ports["udp-echo"]))
    dropped_when(stats, lambda d: d["rate-limited"] >= 150 - answered)
    time.sleep(1.5)  # nothing more arrives: the file's figure is final
    counted = json.loads(stats.read_text())["dropped"]["rate-limited"]
    assert counted > 100

    run = run_monitoring("--manifest", str(udp_supervised.manifest), "--prometheus", "--no-probes")
    m = samples(run.stdout)
    assert value(m, METRIC, service="udp-echo", reason="rate-limited") == counted, run.stdout
    assert value(m, METRIC, service="udp-echo", reason="too-large") == 0
    assert value(m, "sockops_collector_up", collector="servicestats") == 1

    with exporter("--manifest", str(udp_supervised.manifest)) as exp:
        m = exp.metrics()
    assert value(m, METRIC, service="udp-echo", reason="rate-limited") == counted


def test_a_missing_stats_file_is_a_collector_down_not_a_failed_scrape(udp_supervised: Supervised) -> None:
    stats = udp_supervised.dir / "run" / "udp-echo.json"
    pid = udp_supervised.info("sockops-udp-echo")["pid"]
    assert servicestats.read_service("udp-echo", pid)[0] is not None
    hidden = stats.with_suffix(".hidden")
    stats.rename(hidden)
    try:
        run = run_monitoring("--manifest", str(udp_supervised.manifest), "--prometheus", "--no-probes")
    finally:
        hidden.rename(stats)
    m = samples(run.stdout)
    assert value(m, "sockops_collector_up", collector="servicestats") == 0
    assert not any(name == METRIC for name, _ in m)
    assert "sockops_connections" in run.stdout
