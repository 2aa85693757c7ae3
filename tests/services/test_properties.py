"""Property-based: random, split, nested and truncated frames, to the transfer core and to a live server of
each variant. The core never raises; a server always answers or closes, and never logs a traceback."""

from __future__ import annotations

import json
import socket
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from services.protocol.transfer import (
    HEADER_LIMIT,
    NEED_DATA,
    Frame,
    FrameReader,
    GetRequest,
    ListRequest,
    TransferCore,
    encode_frame,
)
from tests.services.conftest import Service, start_service

PATHS = st.one_of(
    st.sampled_from(
        ["hello.txt", "bin", "bin/random.bin", ".", "", "..", "/etc/passwd", "escape.txt", "nope"]
    ),
    st.text(max_size=40),
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=30,
)
REQUESTS = st.fixed_dictionaries(
    {"op": st.sampled_from(["get", "list", "put", ""]), "path": PATHS}, optional={"extra": JSON}
)


def deep(depth: int) -> bytes:
    return b'{"a":' * depth + b"1" + b"}" * depth


def framed(raw: bytes) -> bytes:
    return struct.pack(">I", len(raw)) + raw


FRAMES = st.one_of(
    REQUESTS.map(encode_frame),
    JSON.map(lambda v: framed(json.dumps(v).encode())),
    st.integers(1, 20000).map(lambda d: framed(deep(d))),
    st.integers(1, 60000).map(lambda n: framed(b"[" * n)),
    st.binary(max_size=64).map(framed),
    st.binary(max_size=64),  # not even a frame
)
STREAMS = st.tuples(st.lists(FRAMES, min_size=1, max_size=6), st.lists(st.integers(1, 70000), max_size=5))


def pieces(data: bytes, cuts: list) -> list:
    points = sorted({c % (len(data) + 1) for c in cuts})
    edges = [0, *points, len(data)]
    return [data[a:b] for a, b in zip(edges, edges[1:]) if b > a]


def reply_frames(data: bytes, whole: bool = True) -> list:
    """Every reply a server sent, checked to be frames of JSON objects (get bodies skipped); `whole`: the
    last one too (not after a reset, which may discard what the kernel had not delivered yet)."""
    reader, headers = FrameReader(HEADER_LIMIT), []
    reader.receive_data(data)
    while True:
        event = reader.next_event()
        if event is NEED_DATA:
            assert reader.buffered == 0 or not whole, "a reply was cut short"
            return headers
        assert isinstance(event, Frame), event
        headers.append(event.header)
        if event.header.get("op") == "get" and "error" not in event.header:
            assert reader.take(event.header["size"]) is not None or not whole


@settings(max_examples=300, deadline=None)
@given(STREAMS)
def test_the_core_never_raises_and_answers_in_frames(stream: tuple) -> None:
    frames, cuts = stream
    core = TransferCore()
    out: list = []
    for piece in pieces(b"".join(frames), cuts):
        out += core.receive_data(piece)
    for item in out:
        assert isinstance(item, (bytes, GetRequest, ListRequest)), item
    reply_frames(b"".join(item for item in out if isinstance(item, bytes)))


@pytest.fixture(scope="module")
def live(variant: str, tree: tuple, tmp_path_factory: pytest.TempPathFactory) -> Service:
    args = ["--root", str(tree[0])] + (["--workers", "2"] if variant == "prefork" else [])
    svc = start_service("transfer", variant, tmp_path_factory.mktemp("logs"), *args)
    yield svc
    assert svc.stop() == 0, svc.log_text()
    assert "Traceback" not in svc.log_text()


def exchange(svc: Service, chunks: list) -> tuple:
    """Send the chunks, half-close, and read until the server closes (bounded): (bytes, closed cleanly)."""
    with socket.create_connection(svc.address, timeout=30) as sock:
        try:
            for chunk in chunks:
                sock.sendall(chunk)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # EPIPE, ECONNRESET, ENOTCONN: closed on us after a fatal frame, which is allowed
            pass
        received = bytearray()
        try:
            while True:
                data = sock.recv(1 << 16)  # a server that neither answers nor closes times out here
                if not data:
                    return bytes(received), True
                received += data
        except ConnectionResetError:
            return bytes(received), False


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(stream=STREAMS)
def test_a_live_server_answers_or_closes(live: Service, stream: tuple) -> None:
    frames, cuts = stream
    received, clean = exchange(live, pieces(b"".join(frames), cuts))
    for header in reply_frames(received, whole=clean):
        assert isinstance(header.get("op"), str)
    assert "Traceback" not in live.log_text()
