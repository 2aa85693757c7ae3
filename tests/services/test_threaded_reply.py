"""The threaded driver's reply path: send(2) with the GIL held first, sendall() for whatever is left.

A reply far bigger than the socket buffers makes the first send partial (and later ones hit EAGAIN): every
byte must still arrive once, in order. A peer that is gone must raise the real error, as sendall() would.
"""

from __future__ import annotations

import os
import socket
import threading

import pytest

from services.drivers import threaded


def _drain(sock: socket.socket, want: int, into: bytearray) -> None:
    while len(into) < want:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return
        into += chunk


def test_libc_send_is_available_here() -> None:
    # Without it every reply silently takes the slower sendall() path; on Linux with ctypes it must load.
    assert threaded._SEND is not None


def test_a_reply_larger_than_the_socket_buffers_arrives_whole_and_in_order() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        payload = os.urandom(4 << 20)
        received = bytearray()
        reader = threading.Thread(target=_drain, args=(b, len(payload), received))
        reader.start()
        threaded._replier(a)(payload)  # the first send takes a part, sendall() blocks for the rest
        reader.join(timeout=30)
        assert not reader.is_alive()
        assert bytes(received) == payload


def test_replies_in_a_row_keep_their_order() -> None:
    a, b = socket.socketpair()
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        reply = threaded._replier(a)
        parts = [bytes([i]) * (i * 997 + 1) for i in range(1, 40)]  # some fit the buffer, some do not
        received = bytearray()
        reader = threading.Thread(target=_drain, args=(b, sum(map(len, parts)), received))
        reader.start()
        for part in parts:
            reply(part)
        reader.join(timeout=30)
        assert not reader.is_alive()
        assert bytes(received) == b"".join(parts)


def test_a_reply_to_a_closed_peer_raises_the_real_error() -> None:
    a, b = socket.socketpair()
    with a:
        b.close()
        with pytest.raises((BrokenPipeError, ConnectionResetError)):
            threaded._replier(a)(b"hello")
