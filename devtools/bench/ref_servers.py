"""Reference servers for `invoke bench`, run as a script by path with the interpreter under test.

Standalone and stdlib only (Python 3.7+), so it runs with any interpreter the services run with.
Each prints ``PORT <n>`` on stdout once bound and serves until TERM/INT.

- ``tutorial``: the classic tutorial's plain ``socketserver.ThreadingTCPServer`` upper-echo, written the way
  the tutorial writes it (recv(1024), send(data.upper()), default backlog of 5, Nagle left on). It is the
  baseline the services are meant to beat, warts included; do not "fix" it. The UDP form is the tutorial's
  UDPServer handler (sendto(data.upper())).
- ``tutorial-1024``: the same server and handler with one change, a listen backlog of 1024
  (``request_queue_size``). The tutorial's backlog of 5 drops SYNs at 50+ connections, so its figure is not a
  valid baseline there; this twin is (TCP only: a datagram socket has no backlog).
- ``asyncio``: a minimal stdlib asyncio Protocol / DatagramProtocol upper-echo.
- ``sendfile``: the transfer reference: a thread per connection reads one request, ``socket.sendfile()``s the
  file and closes (the kernel does the copying: the practical limit of loopback for one file).

usage: python ref_servers.py KIND [--udp] [--host 127.0.0.1] [--port 0] [--file PATH]
"""

import argparse
import asyncio
import signal
import socketserver
import sys


# --- the tutorial, as written there ------------------------------------------------------------------------
class MyTCPHandler(socketserver.BaseRequestHandler):
    def handle(self):
        while True:
            data = self.request.recv(1024)
            if not data:
                break
            self.request.send(data.upper())


class MyUDPHandler(socketserver.BaseRequestHandler):
    def handle(self):
        data = self.request[0]
        sock = self.request[1]
        sock.sendto(data.upper(), self.client_address)


def _announce(port):
    sys.stdout.write(f"PORT {port}\n")
    sys.stdout.flush()


def _stop_on_term(stop):
    # TERM ends the serve loop from the main thread, like Ctrl-C does.
    def handler(signum, frame):
        stop()

    signal.signal(signal.SIGTERM, handler)


class BacklogThreadingTCPServer(socketserver.ThreadingTCPServer):
    # the only difference from the tutorial: listen(1024) instead of listen(5)
    request_queue_size = 1024


def _serve_until_term(server):
    """Announce the bound port, serve until SIGTERM, close: every socketserver reference ends the same way."""
    _announce(server.server_address[1])

    def stop():
        raise KeyboardInterrupt

    _stop_on_term(stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def run_tutorial(host, port, udp, backlog_1024=False):
    if udp:
        server_cls = socketserver.ThreadingUDPServer
    elif backlog_1024:
        server_cls = BacklogThreadingTCPServer
    else:
        server_cls = socketserver.ThreadingTCPServer
    server = server_cls((host, port), MyUDPHandler if udp else MyTCPHandler)
    _serve_until_term(server)


# --- minimal asyncio ---------------------------------------------------------------------------------------
class EchoProtocol(asyncio.Protocol):
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.transport.write(data.upper())


class EchoDatagramProtocol(asyncio.DatagramProtocol):
    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        self.transport.sendto(data.upper(), addr)


def run_asyncio(host, port, udp):
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    if udp:
        transport, _ = loop.run_until_complete(
            loop.create_datagram_endpoint(EchoDatagramProtocol, local_addr=(host, port))
        )
        bound = transport.get_extra_info("sockname")[1]
    else:
        server = loop.run_until_complete(loop.create_server(EchoProtocol, host, port, backlog=1024))
        bound = server.sockets[0].getsockname()[1]
    _announce(bound)
    loop.add_signal_handler(signal.SIGTERM, loop.stop)
    loop.add_signal_handler(signal.SIGINT, loop.stop)
    try:
        loop.run_forever()
    finally:
        loop.close()


# --- raw sendfile, for transfer ----------------------------------------------------------------------------
class SendfileHandler(socketserver.BaseRequestHandler):
    path = ""

    def handle(self):
        self.request.recv(4096)  # any request: the reply is the whole file, then close
        with open(self.path, "rb") as f:
            self.request.sendfile(f)


class SendfileServer(socketserver.ThreadingTCPServer):
    # one thread per connection and a deep backlog, so many clients download at once, as from the variants
    request_queue_size = 1024
    daemon_threads = True
    allow_reuse_address = True


def run_sendfile(host, port, path):
    handler = type("Handler", (SendfileHandler,), {"path": path})
    server = SendfileServer((host, port), handler)
    _serve_until_term(server)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=["tutorial", "tutorial-1024", "asyncio", "sendfile"])
    parser.add_argument("--udp", action="store_true")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--file", default="")
    args = parser.parse_args(argv)
    if args.kind in ("tutorial", "tutorial-1024"):
        if args.udp and args.kind == "tutorial-1024":
            parser.error("tutorial-1024 is TCP only (a datagram socket has no listen backlog)")
        run_tutorial(args.host, args.port, args.udp, backlog_1024=args.kind == "tutorial-1024")
    elif args.kind == "asyncio":
        run_asyncio(args.host, args.port, args.udp)
    else:
        if not args.file:
            parser.error("sendfile needs --file")
        run_sendfile(args.host, args.port, args.file)


if __name__ == "__main__":
    main()
