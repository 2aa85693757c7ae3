"""Protocol cores, no sockets: every input whole, one byte at a time and with trailing data (h11 style)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.errors import ProtocolError
from services.files import FileRoot, Found, open_body
from services.protocol.echo import MAX_DATAGRAM, Dropped, EchoCore, UdpEchoCore
from services.protocol.transfer import (
    HEADER_LIMIT,
    NEED_DATA,
    BadFrame,
    FileBody,
    Frame,
    FrameReader,
    GetRequest,
    ListRequest,
    TransferConnection,
    TransferCore,
    check_relative,
    encode_frame,
)
from tests.services.conftest import SECRET, make_tree


def feed(core, data: bytes, step: int) -> list:
    out: list = []
    for i in range(0, len(data), step):
        out += core.receive_data(data[i : i + step])
    return out


def frames(data: bytes) -> list:
    """Split reply bytes into (header, body) pairs, reading bodies for get replies."""
    reader, out = FrameReader(), []
    reader.receive_data(data)
    while True:
        ev = reader.next_event()
        if ev is NEED_DATA:
            assert reader.buffered == 0, "trailing bytes after the last reply"
            return out
        assert isinstance(ev, Frame)
        body = b""
        if ev.header.get("op") == "get" and "error" not in ev.header:
            body = reader.take(ev.header["size"])
            assert body is not None
        out.append((ev.header, body))


def materialize(outputs: list) -> bytes:
    """What a driver would put on the wire: bytes as they are, bodies read from their files."""
    wire = b""
    for item in outputs:
        if isinstance(item, FileBody):
            with open_body(item) as f:
                wire += f.read(item.size)
        else:
            wire += item
    return wire


# ---- echo -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("step", [1, 3, 1 << 20], ids=["byte-at-a-time", "3-bytes", "whole"])
def test_echo_any_split(step: int) -> None:
    data = b"Hello, World! \xff\x00 abc-xyz ABC \xe9t\xe9" * 7
    out = feed(EchoCore(), data, step)
    assert b"".join(out) == b"HELLO, WORLD! \xff\x00 ABC-XYZ ABC \xe9T\xe9" * 7
    assert EchoCore().idle
    assert not EchoCore().closing


def test_echo_upper_cases_ascii_letters_only() -> None:
    every = bytes(range(256))
    out = EchoCore().receive_data(every)[0]
    expected = bytes(b - 32 if 97 <= b <= 122 else b for b in every)
    assert out == expected


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=4096), st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=50))
def test_echo_property_any_split(data: bytes, cuts: list) -> None:
    core, out, i, k = EchoCore(), [], 0, 0
    while i < len(data):
        step = cuts[k % len(cuts)]
        out += core.receive_data(data[i : i + step])
        i, k = i + step, k + 1
    assert b"".join(out) == data.upper()


# ---- udp echo ---------------------------------------------------------------------------------------------


def test_udp_answers_normal_datagrams() -> None:
    core = UdpEchoCore(own=frozenset({("127.0.0.1", 8080)}))
    assert core.datagram_received(b"abc", ("127.0.0.1", 40000)) == b"ABC"
    assert core.datagram_received(b"", ("10.0.0.1", 5000)) == b""
    assert core.datagram_received(b"x" * MAX_DATAGRAM, ("127.0.0.1", 40000)) == b"X" * MAX_DATAGRAM


@pytest.mark.parametrize(
    ("own", "source", "reason"),
    [
        ({("127.0.0.1", 8080)}, ("127.0.0.1", 53), "privileged-source-port"),
        ({("127.0.0.1", 8080)}, ("127.0.0.1", 7), "privileged-source-port"),
        ({("127.0.0.1", 8080)}, ("127.0.0.1", 8080), "own-socket"),
        ({("0.0.0.0", 8080)}, ("192.168.1.5", 8080), "own-socket"),
        ({("::", 8080)}, ("::1", 8080, 0, 0), "own-socket"),
    ],
    ids=["dns-port", "echo-port", "same-address", "wildcard-bound", "ipv6-wildcard"],
)
def test_udp_reflection_guards(own: set, source: tuple, reason: str) -> None:
    result = UdpEchoCore(own=frozenset(own)).datagram_received(b"ping", source)
    assert isinstance(result, Dropped)
    assert result.reason == reason


def test_udp_same_port_other_host_is_answered_when_bound_to_one_address() -> None:
    core = UdpEchoCore(own=frozenset({("127.0.0.1", 8080)}))
    assert core.datagram_received(b"hi", ("127.0.0.2", 8080)) == b"HI"


def test_udp_size_cap() -> None:
    result = UdpEchoCore().datagram_received(b"x" * (MAX_DATAGRAM + 1), ("127.0.0.1", 40000))
    assert isinstance(result, Dropped)
    assert result.reason == "too-large"


# ---- transfer framing -------------------------------------------------------------------------------------


REQUESTS = [
    ({"op": "get", "path": "a/b.txt"}, GetRequest("a/b.txt")),
    ({"op": "list", "path": "."}, ListRequest(".")),
    ({"op": "list", "path": "dïr/ü"}, ListRequest("dïr/ü")),
]


@pytest.mark.parametrize("step", [1, 2, 5, 1 << 20], ids=["byte-at-a-time", "2-bytes", "5-bytes", "whole"])
def test_requests_any_split_with_trailing_data(step: int) -> None:
    conn = TransferConnection()
    wire = b"".join(encode_frame(h) for h, _ in REQUESTS)
    trailing = encode_frame({"op": "get", "path": "next"})[:3]
    events = []
    data = wire + trailing
    for i in range(0, len(data), step):
        conn.receive_data(data[i : i + step])
        while (ev := conn.next_event()) is not NEED_DATA:
            events.append(ev)
    assert events == [e for _, e in REQUESTS]
    assert not conn.idle  # the trailing partial frame stays buffered
    conn.receive_data(encode_frame({"op": "get", "path": "next"})[3:])
    assert conn.next_event() == GetRequest("next")
    assert conn.idle


@pytest.mark.parametrize(
    ("raw", "code", "fatal"),
    [
        (struct.pack(">I", HEADER_LIMIT + 1) + b"{", "header-too-long", True),
        (struct.pack(">I", 0xFFFFFFFF), "header-too-long", True),
        (struct.pack(">I", 0), "bad-header", False),
        (struct.pack(">I", 5) + b"nope!", "bad-header", False),
        (struct.pack(">I", 3) + b"\xff\xfe{", "bad-header", False),
        (struct.pack(">I", 2) + b"[]", "bad-header", False),
        (encode_frame({"op": "put", "path": "x"}), "unknown-op", False),
        (encode_frame({"path": "x"}), "missing-field", False),
        (encode_frame({"op": "get"}), "missing-field", False),
        (encode_frame({"op": "get", "path": 7}), "bad-field", False),
    ],
    ids=[
        "too-long",
        "length-4GiB",
        "empty-header",
        "not-json",
        "not-utf8",
        "not-an-object",
        "unknown-op",
        "missing-op",
        "missing-path",
        "path-not-string",
    ],
)
@pytest.mark.parametrize("step", [1, 1 << 20], ids=["byte-at-a-time", "whole"])
def test_bad_frames(raw: bytes, code: str, fatal: bool, step: int) -> None:
    conn = TransferConnection()
    follow = encode_frame({"op": "list", "path": "."})
    events = []
    data = raw + follow
    for i in range(0, len(data), step):
        conn.receive_data(data[i : i + step])
        while (ev := conn.next_event()) is not NEED_DATA:
            events.append(ev)
    assert isinstance(events[0], BadFrame)
    assert events[0].code == code
    assert events[0].fatal is fatal
    # A recoverable error leaves the stream in sync: the next request is parsed; a fatal one stops everything.
    assert events[1:] == ([] if fatal else [ListRequest(".")])


def test_encode_refuses_oversized_header() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        encode_frame({"x": "y" * HEADER_LIMIT})


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.dictionaries(
            st.text(max_size=10),
            st.one_of(st.text(max_size=30), st.integers(), st.booleans(), st.none()),
            max_size=5,
        ),
        max_size=8,
    ),
    st.integers(min_value=1, max_value=40),
)
def test_frames_round_trip(headers: list, step: int) -> None:
    wire = b"".join(encode_frame(h) for h in headers)
    reader, got = FrameReader(), []
    for i in range(0, len(wire), step):
        reader.receive_data(wire[i : i + step])
        while (ev := reader.next_event()) is not NEED_DATA:
            got.append(ev.header)
    assert got == headers
    assert reader.buffered == 0


# ---- paths and the file root ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/etc/passwd", "..", "../x", "a/../../x", "a/..", "x\x00y", "//etc"],
    ids=[
        "absolute",
        "dotdot",
        "dotdot-prefix",
        "dotdot-inner",
        "dotdot-last",
        "nul",
        "double-slash-absolute",
    ],
)
def test_check_relative_rejects(path: str) -> None:
    rejected = check_relative(path)
    assert rejected is not None
    assert rejected.code == "bad-path"


@pytest.mark.parametrize("path", ["a", "a/b.c", ".", "", "a..b", "..a/b", "./x"])
def test_check_relative_accepts(path: str) -> None:
    assert check_relative(path) is None


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    base = tmp_path_factory.mktemp("core")
    root = base / "root"
    root.mkdir()
    return root, make_tree(root, base / "outside")


def answered(files: FileRoot, outputs: list) -> list:
    """What a driver does with the core's outputs: bytes go out as they are, file requests go to the root."""
    out: list = []
    for item in outputs:
        out += [item] if isinstance(item, bytes) else files.answer(item)
    return out


def run_core(root: Path, requests: list, step: int) -> list:
    core = TransferCore()
    wire = b"".join(encode_frame(r) for r in requests)
    return frames(materialize(answered(FileRoot(str(root)), feed(core, wire, step))))


def test_the_core_asks_the_driver_for_files() -> None:
    """The core decides what the bytes decide (bad frames, bad paths) and asks for the rest, in order."""
    core = TransferCore()
    wire = b"".join(
        encode_frame(h)
        for h in ({"op": "get", "path": "a/b"}, {"op": "get", "path": "../x"}, {"op": "list", "path": "."})
    )
    first, second, third = core.receive_data(wire)
    assert first == GetRequest("a/b")
    assert json.loads(second[4:])["error"] == "bad-path"
    assert third == ListRequest(".")


def test_file_root_hashes_once_per_file_version(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"version one")
    files = FileRoot(str(tmp_path))
    found = files.lookup(GetRequest("f"))
    assert isinstance(found, Found), "first get of a file: the digest must be computed (by the driver)"
    assert "sha256" not in found.header
    digest = files.digest(found)
    assert digest == hashlib.sha256(b"version one").hexdigest()
    header_frame, body = files.lookup(GetRequest("f"))  # cached: answered at once
    assert json.loads(header_frame[4:])["sha256"] == digest
    assert body.size == len(b"version one")
    (tmp_path / "f").write_bytes(b"version two, longer")
    assert isinstance(files.lookup(GetRequest("f")), Found), "a new version is hashed again"


@pytest.mark.parametrize("step", [1, 7, 1 << 20], ids=["byte-at-a-time", "7-bytes", "whole"])
def test_transfer_core_serves_files_and_lists(tree: tuple, step: int) -> None:
    root, files = tree
    replies = run_core(
        root,
        [
            {"op": "get", "path": "hello.txt"},
            {"op": "get", "path": "bin/random.bin"},
            {"op": "get", "path": "empty.bin"},
            {"op": "list", "path": "bin"},
            {"op": "get", "path": "link-inside.txt"},
            {"op": "get", "path": "docs/a b/ünïcode.txt"},
        ],
        step,
    )
    (h1, b1), (h2, b2), (_, b3), (h4, _), (h5, b5), (h6, b6) = replies
    assert (b1, b2, b3, b6) == (
        files["hello.txt"],
        files["bin/random.bin"],
        b"",
        files["docs/a b/ünïcode.txt"],
    )
    assert h2["sha256"] == hashlib.sha256(files["bin/random.bin"]).hexdigest()
    assert h2["size"] == len(files["bin/random.bin"])
    assert h1["filename"] == "hello.txt"
    assert h6["filename"] == "ünïcode.txt"
    assert h4["entries"] == [
        {"name": "big.bin", "type": "file", "size": 12 * 1024 * 1024},
        {"name": "random.bin", "type": "file", "size": 300_000},
    ]
    assert b5 == files["hello.txt"]  # a symlink that stays inside the root is served
    assert h5["filename"] == "link-inside.txt"  # under the name it was asked for


def test_transfer_list_root_shows_symlinks_without_following(tree: tuple) -> None:
    root, _ = tree
    [(header, _)] = run_core(root, [{"op": "list", "path": "."}], 1 << 20)
    by_name = {e["name"]: e for e in header["entries"]}
    assert by_name["escape.txt"]["type"] == "symlink"
    assert by_name["escape-dir"]["type"] == "symlink"
    assert by_name["bin"]["type"] == "dir"
    assert by_name["hello.txt"] == {"name": "hello.txt", "type": "file", "size": 15}
    assert [e["name"] for e in header["entries"]] == sorted(by_name)


ESCAPES = [
    ("get", "/etc/passwd", "bad-path"),
    ("get", "../outside/secret.txt", "bad-path"),
    ("get", "bin/../../outside/secret.txt", "bad-path"),
    ("get", "hello.txt\x00.png", "bad-path"),
    ("get", "escape.txt", "forbidden"),
    ("get", "escape-dir/deep.txt", "forbidden"),
    ("list", "escape-dir", "forbidden"),
    ("list", "docs/up", "forbidden"),
    ("get", "docs/up/outside/secret.txt", "forbidden"),
    ("get", "abs-root/etc/passwd", "forbidden"),
    ("list", "/", "bad-path"),
    ("get", "missing.txt", "not-found"),
    ("list", "missing", "not-found"),
    ("get", "bin", "not-a-file"),
    ("get", ".", "not-a-file"),
    ("list", "hello.txt", "not-a-directory"),
]


@pytest.mark.parametrize(("op", "path", "code"), ESCAPES, ids=[f"{o}-{c}-{p!r}" for o, p, c in ESCAPES])
def test_transfer_core_rejects(tree: tuple, op: str, path: str, code: str) -> None:
    root, _ = tree
    core = TransferCore()
    outputs = answered(FileRoot(str(root)), core.receive_data(encode_frame({"op": op, "path": path})))
    assert all(isinstance(o, bytes) for o in outputs), "an error reply never carries a body"
    [(header, body)] = frames(b"".join(outputs))
    assert header["error"] == code
    assert header["message"]
    assert body == b""
    assert SECRET not in b"".join(outputs)
    assert not core.closing


def test_transfer_core_too_long_header_closes() -> None:
    core = TransferCore()
    outputs = core.receive_data(
        struct.pack(">I", HEADER_LIMIT + 1) + b"{" + encode_frame({"op": "list", "path": "."})
    )
    [(header, _)] = frames(b"".join(outputs))
    assert header["error"] == "header-too-long"
    assert core.closing
    assert core.receive_data(encode_frame({"op": "list", "path": "."})) == []


def test_file_body_refuses_a_swapped_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"one")
    found = FileRoot(str(tmp_path)).lookup(GetRequest("f"))
    assert isinstance(found, Found)
    os.replace(tmp_path / "f", tmp_path / "g")
    (tmp_path / "f").write_bytes(b"two")
    with pytest.raises(ProtocolError, match="changed while being served"):
        open_body(found.body)


def test_error_replies_are_json_with_code_and_message(tree: tuple) -> None:
    root, _ = tree
    out = answered(
        FileRoot(str(root)), TransferCore().receive_data(encode_frame({"op": "get", "path": "nope"}))
    )
    raw = out[0][4:]
    assert json.loads(raw) == {"op": "get", "error": "not-found", "message": "no such file: 'nope'"}


def test_replies_fit_the_header_limit_whatever_was_asked(tmp_path: Path) -> None:
    core, files = TransferCore(), FileRoot(str(tmp_path))
    requests = [
        {"op": "get", "path": "é/" * 8000},
        {"op": "get", "path": "é/" * 2000},
        {"op": "list", "path": "../" * 20000},
        {"op": "\u2603" * 9000, "path": "."},
    ]
    replies = frames(
        b"".join(answered(files, core.receive_data(b"".join(encode_frame(r) for r in requests))))
    )
    assert [h["error"] for h, _ in replies] == ["bad-path", "not-found", "bad-path", "unknown-op"]
    assert all(len(h["message"]) < 400 for h, _ in replies)


def test_a_huge_directory_listing_is_truncated_not_fatal(tmp_path: Path) -> None:
    for i in range(1500):
        (tmp_path / (f"{i:04d}-" + "n" * 60)).touch()
    core = TransferCore()
    outputs = answered(FileRoot(str(tmp_path)), core.receive_data(encode_frame({"op": "list", "path": "."})))
    [(header, _)] = frames(b"".join(outputs))
    assert header["truncated"] is True
    assert header["total"] == 1500
    assert 0 < len(header["entries"]) < 1500
    assert header["entries"][0]["name"].startswith("0000-")
    assert not core.closing


@pytest.mark.parametrize(
    "module",
    [
        "services.protocol.echo",
        "services.protocol.transfer",
        "services.client",
        "services.addr",
        "services.__main__",
        "services.drivers.prefork",
        "services.drivers.lifecycle",
        "services.drivers.runtime",
    ],
)
def test_docstring_examples(module: str) -> None:
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module))
    assert result.attempted > 0
    assert result.failed == 0
