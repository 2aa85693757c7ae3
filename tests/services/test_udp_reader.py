"""The asyncio variant's udp-echo reader (issue 14's speed paragraph): plain recvfrom/sendto from a loop
reader callback, at most UDP_BATCH datagrams per wake-up, with the core's rate limit and drop counts.

Real loopback sockets; the reader's callback is called directly (what the loop does when the socket is
readable), and once through a real event loop. The speed itself is the bench's to measure, not a test's.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Iterator

import pytest

from services.drivers.asyncio_loop import DatagramReader
from services.drivers.runtime import UDP_BATCH, Settings

LOG = logging.getLogger("test-udp-reader")


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    server.setblocking(False)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", 0))
    peer.settimeout(5.0)
    yield server, peer
    server.close()
    peer.close()


def settings(**kw: object) -> Settings:
    return Settings(service="udp-echo", variant="asyncio", host="127.0.0.1", port=0, **kw)


def replies(peer: socket.socket, count: int) -> list[bytes]:
    return [peer.recv(65536) for _ in range(count)]


def test_one_wake_up_answers_at_most_a_batch_in_order(pair: tuple) -> None:
    server, peer = pair
    reader = DatagramReader(server, settings(), LOG)
    sent = [f"datagram {i}".encode() for i in range(UDP_BATCH + 10)] + [b""]
    for data in sent:
        peer.sendto(data, server.getsockname())
    reader.readable()
    assert reader.seen == UDP_BATCH  # bounded per wake-up: the loop's other callbacks run in between
    reader.readable()
    assert reader.seen == len(sent)
    assert replies(peer, len(sent)) == [d.upper() for d in sent]  # the empty one is answered too
    reader.readable()  # nothing queued: returns at once
    assert reader.seen == len(sent)


def test_rate_limit_drops_are_counted(pair: tuple) -> None:
    server, peer = pair
    reader = DatagramReader(server, settings(udp_rate=5.0, udp_burst=5.0, udp_rate_exempt=()), LOG)
    for i in range(20):
        peer.sendto(b"x%d" % i, server.getsockname())
    reader.readable()
    assert reader.seen == 20
    assert replies(peer, 5) == [b"X%d" % i for i in range(5)]
    assert sum(reader.core.dropped.values()) == 15
    peer.settimeout(0.2)
    with pytest.raises(socket.timeout):
        peer.recv(65536)


def test_in_a_running_loop(pair: tuple) -> None:
    server, peer = pair
    reader = DatagramReader(server, settings(), LOG)

    async def main() -> list[bytes]:
        loop = asyncio.get_running_loop()
        loop.add_reader(server.fileno(), reader.readable)
        try:
            for i in range(100):
                peer.sendto(b"loop %d" % i, server.getsockname())
            return await loop.run_in_executor(None, replies, peer, 100)
        finally:
            loop.remove_reader(server.fileno())

    assert asyncio.run(main()) == [b"LOOP %d" % i for i in range(100)]
