"""I/O drivers: they only move bytes between sockets and a protocol core (see services.protocol).

threaded (socketserver), prefork (a master supervising selectors workers), selectors (one epoll thread),
asyncio (Protocol; udp-echo through loop.add_reader). `runtime` holds what they share: settings, binding,
logging, cores.
"""
