"""Socket counts are exact: real loopback connections in every state, compared with `ss` for the same port."""

from __future__ import annotations

import contextlib
import socket
import struct
import subprocess
import sys
import textwrap

import pytest

from monitoring.collect import netlink, procnet, sockets
from monitoring.model import TCP_STATES
from tests.monitoring.conftest import REPO, private_netns
from tests.monitoring.states import PLAN, SS_STATES, server_states, ss_count

FAMILIES = [pytest.param(socket.AF_INET, id="ipv4"), pytest.param(socket.AF_INET6, id="ipv6")]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("source", ["netlink", pytest.param("proc", marks=pytest.mark.root)])
def test_state_counts_equal_ss(family: int, source: str) -> None:
    # netlink is exact even with other sockets churning (this shared machine); /proc gets a quiet netns
    with private_netns() if source == "proc" else contextlib.nullcontext():
        _state_counts_equal_ss(family, source)


def _state_counts_equal_ss(family: int, source: str) -> None:
    with server_states(family) as held:
        table, used = sockets.read_ports("tcp", [held.port], source=source)
        sample = table.sample(held.port)
        from_ss = {state: ss_count(state, held.port) for state in SS_STATES}
    assert used == source
    ours = {state: sample.count(state) for state in from_ss}
    assert ours == from_ss == PLAN
    assert sum(sample.states.values()) == sample.sockets == sum(PLAN.values())
    assert set(sample.states) == set(TCP_STATES)


@pytest.mark.root  # the /proc half runs in a private netns: no other sockets churning
def test_listener_accept_queue_and_backlog_match_ss(netns: None) -> None:
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(7)
    port = lst.getsockname()[1]
    clients = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(3)]  # never accepted
    try:
        (listener,) = sockets.read_ports("tcp", [port])[0].sample(port).listeners
        line = subprocess.run(
            ["ss", "-ltnH", f"( sport = :{port} )"], check=True, capture_output=True, text=True
        ).stdout.split()
        assert (listener.accept_queue, listener.backlog) == (int(line[1]), int(line[2])) == (3, 7)
        (from_proc,) = sockets.read_ports("tcp", [port], source="proc")[0].sample(port).listeners
        assert (from_proc.accept_queue, from_proc.backlog) == (3, None)  # /proc can't see the backlog
    finally:
        for c in clients:
            c.close()
        lst.close()


@pytest.mark.root
@pytest.mark.parametrize("family", FAMILIES)
def test_proc_parser_agrees_with_netlink(family: int, netns: None) -> None:
    def key(s):
        # /proc shows no listener backlog (wqueue), request sockets' uid differs by kernel; the rest agrees
        return (
            s.state,
            s.family,
            s.local_addr,
            s.local_port,
            s.remote_addr,
            s.remote_port,
            s.rqueue,
            s.inode,
        )

    with server_states(family) as held:
        via_netlink = sorted(map(key, netlink.sockets("tcp", [held.port])))
        via_proc = sorted(map(key, procnet.sockets("tcp", [held.port])))
    assert via_netlink == via_proc
    assert len(via_netlink) == sum(PLAN.values())


@pytest.mark.root  # the /proc half runs in a private netns: no other sockets churning
def test_udp_port_and_receive_queue_match_ss(netns: None) -> None:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind(("127.0.0.1", 0))
    port = rx.getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as tx:
        for _ in range(3):
            tx.sendto(b"ping", ("127.0.0.1", port))
    try:
        line = subprocess.run(
            ["ss", "-uanH", f"( sport = :{port} )"], check=True, capture_output=True, text=True
        ).stdout.split()
        for source in ("netlink", "proc"):
            sample = sockets.read_ports("udp", [port], source=source)[0].sample(port)
            assert sample.count("UNCONN") == 1
            assert sample.recv_queue == int(line[1]) > 0
    finally:
        rx.close()


def test_several_ports_filtered_in_the_kernel() -> None:
    """One dump with an OR-filter of ports returns exactly the sockets on those ports, nothing else."""
    listeners = []
    for _ in range(3):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        listeners.append(s)
    ports = [s.getsockname()[1] for s in listeners]
    try:
        found = netlink.sockets("tcp", ports[:2])
        assert sorted(s.local_port for s in found) == sorted(ports[:2])
        assert {s.state for s in found} == {"LISTEN"}
    finally:
        for s in listeners:
            s.close()


# --- pure parsers on bytes ------------------------------------------------------------------------------


def _diag_msg(state: int, sport: int, dport: int, inode: int, family: int = socket.AF_INET) -> bytes:
    src = socket.inet_pton(family, "127.0.0.1" if family == socket.AF_INET else "::1").ljust(16, b"\0")
    dst = socket.inet_pton(family, "127.0.0.2" if family == socket.AF_INET else "::2").ljust(16, b"\0")
    body = struct.pack("=BBBB", family, state, 0, 0) + struct.pack(">HH", sport, dport) + src + dst
    body += struct.pack("=I", 0) + b"\0" * 8 + struct.pack("=IIIII", 0, 5, 9, 1000, inode)
    return (
        struct.pack("=IHHII", 16 + len(body), netlink.SOCK_DIAG_BY_FAMILY, netlink.NLM_F_MULTI, 1, 0) + body
    )


def test_parse_dump_on_recorded_bytes() -> None:
    done = struct.pack("=IHHIIi", 20, netlink.NLMSG_DONE, netlink.NLM_F_MULTI, 1, 0, 0)
    chunk = _diag_msg(1, 8080, 40000, 77) + _diag_msg(6, 8080, 40001, 0, socket.AF_INET6)
    result = netlink.parse_dump("tcp", [chunk, done])
    assert [
        (s.family, s.state, s.local_addr, s.local_port, s.remote_addr, s.remote_port) for s in result
    ] == [
        (4, "ESTABLISHED", "127.0.0.1", 8080, "127.0.0.2", 40000),
        (6, "TIME_WAIT", "::1", 8080, "::2", 40001),
    ]
    assert (result[0].rqueue, result[0].wqueue, result[0].uid, result[0].inode) == (5, 9, 1000, 77)
    assert netlink.count_messages(_diag_msg(6, 1, 2, 0) * 3 + done) == 3  # fast path: all 88-byte messages
    assert netlink.count_messages(chunk + done) == 2


def test_columns_fast_path_equals_message_by_message_decode() -> None:
    """Strided reads of a uniform run (listeners inside it) + a mixed tail = decoding each message."""
    done = struct.pack("=IHHIIi", 20, netlink.NLMSG_DONE, netlink.NLM_F_MULTI, 1, 0, 0)
    run = [_diag_msg(st, 8080 + i % 3, 40000 + i, 100 + i) for i, st in enumerate([1, 1, 10, 8, 1, 10, 4])]
    # a full socket's message carries attributes (here INET_DIAG_SHUTDOWN): a different size ends the run
    full = _diag_msg(1, 8081, 41001, 300)
    full = struct.pack("=I", len(full) + 8) + full[4:] + struct.pack("=HHB3x", 5, 8, 0)
    tail = full + _diag_msg(6, 8081, 41000, 0, socket.AF_INET6) + _diag_msg(10, 443, 0, 7, socket.AF_INET6)
    chunk = b"".join(run) + tail + done
    assert netlink.uniform_prefix(chunk)[0] == len(run)
    cols = netlink.Columns()
    cols.add(chunk)
    raws = [raw for _mtype, raw in netlink.iter_raw(chunk) if raw is not None]
    assert list(cols.states) == [r[1] for r in raws]
    assert cols.ports == [r[2] for r in raws]
    assert cols.inodes == [r[9] for r in raws]
    assert cols.kept == [r for r in raws if r[1] == 10]
    table = sockets.count_columns([8080, 8081, 443], cols)
    plain = sockets.count_ports("tcp", [8080, 8081, 443], sockets.rows_from_raw("tcp", raws))
    assert table == plain


def test_kernel_error_message_names_the_fix() -> None:
    error = struct.pack("=IHHIIi", 36, netlink.NLMSG_ERROR, 0, 1, 0, -22) + b"\0" * 16
    with pytest.raises(netlink.CollectError, match="EINVAL"):
        netlink.parse_dump("tcp", [error])


def test_port_filter_layout_is_accepted_by_the_kernel_audit() -> None:
    """The kernel rejects malformed bytecode with EINVAL; 1..5 ports must all be accepted."""
    for n in range(1, 6):
        list(netlink.dump_raw("tcp", ports=list(range(1, n + 1))))


@pytest.mark.root
def test_system_time_wait_total_is_exact_in_a_private_namespace() -> None:
    """System-wide totals move constantly on a shared machine; in a fresh netns they're ours alone."""
    if subprocess.run(["unshare", "-n", "true"], capture_output=True, check=False).returncode != 0:
        pytest.fail("unshare -n failed: needs root (the tests run as root in CI)")
    script = textwrap.dedent(
        """
        import socket, subprocess
        from monitoring.collect import sockets, system
        from tests.monitoring.states import PLAN, server_states
        subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
        assert sockets.time_wait_total("netlink") == 0
        with server_states(socket.AF_INET), server_states(socket.AF_INET6):
            ss = subprocess.run(["ss", "-tanH", "state", "time-wait"], capture_output=True, text=True).stdout
            for source in ("netlink", "proc"):
                n = sockets.time_wait_total(source)
                assert n == len(ss.splitlines()) == 2 * PLAN["TIME_WAIT"], source
            sample = system.system_sample(lambda: sockets.time_wait_total("netlink"))
            assert sample.time_wait == 2 * PLAN["TIME_WAIT"]
            assert sample.sockstat_tw >= sample.time_wait  # sockstat's tw: approximate
            assert sample.tw_buckets_max > 0 and sample.ephemeral_low < sample.ephemeral_high
        print("ok")
        """
    )
    proc = subprocess.run(
        ["unshare", "-n", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


def _identity(raw: netlink.RawDiag) -> tuple:
    fam, st, sport, dport, src, dst, _rq, _wq, uid, ino = raw
    return (fam, st, sport, dport, src, dst, uid, ino)


@pytest.mark.parametrize("family", FAMILIES)
def test_bulk_counting_paths_agree(family: int) -> None:
    """The fast paths (bulk count_raw, TIME_WAIT from its own walk, v1 one-walk dumps) = the plain counter."""
    with server_states(family) as held:
        raws = list(netlink.dump_raw("tcp", ports=[held.port]))
        per_family = [
            r for fam in (4, 6) for r in netlink.dump_raw("tcp", ports=[held.port], families=(fam,))
        ]
        plain = sockets.count_ports("tcp", [held.port], sockets.rows_from_raw("tcp", raws)).sample(held.port)
        bulk = sockets.count_raw("tcp", [held.port], raws).sample(held.port)
        combined, total = sockets.tcp_table_and_time_wait([held.port])
        ss_total = len(
            subprocess.run(
                ["ss", "-tanH", "state", "time-wait"], capture_output=True, text=True, check=True
            ).stdout.splitlines()
        )
    # queue sizes (fields 6, 7) of FIN_WAIT1/LAST_ACK sockets move between two dumps; identity must not
    assert sorted(_identity(r) for r in raws) == sorted(_identity(r) for r in per_family)
    assert dict(plain.states) == dict(bulk.states) == dict(combined.sample(held.port).states)
    assert plain.listeners == bulk.listeners == combined.sample(held.port).listeners
    assert total >= PLAN["TIME_WAIT"]
    assert ss_total >= PLAN["TIME_WAIT"]
