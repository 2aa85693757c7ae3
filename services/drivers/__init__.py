"""I/O drivers: they only move bytes between sockets and a protocol core (see services.protocol).

threaded (socketserver), prefork (a master supervising selectors workers), selectors (one epoll thread),
asyncio (Protocol / DatagramProtocol). `runtime` holds what they share: settings, binding, logging, cores.
"""
