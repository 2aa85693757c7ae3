"""The XML-RPC transport over a unix stream socket that supervisor.proxy() uses.

Kept out of supervisor.py so that importing the supervisord client (restart counting, program samples) does
not pull in xmlrpc.client, http.client and ssl (~25 ms) for a check that never talks to supervisord.
"""

from __future__ import annotations

import http.client
import socket
import xmlrpc.client
from typing import Any, Optional


class _UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: Optional[float]) -> None:
        super().__init__("localhost", timeout=timeout)
        self._unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._unix_path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class UnixTransport(xmlrpc.client.Transport):
    """xmlrpc.client transport speaking HTTP over a unix stream socket."""

    def __init__(self, path: str, timeout: Optional[float] = 5.0) -> None:
        super().__init__()
        self._unix_path = path
        self._timeout = timeout

    def make_connection(self, host: Any) -> http.client.HTTPConnection:
        # Registered like the base class does, so Transport.close() (ServerProxy's `with`) closes it.
        if self._connection[1] is not None and self._connection[0] == host:
            return self._connection[1]
        self._connection = (host, _UnixHTTPConnection(self._unix_path, self._timeout))
        return self._connection[1]


def server_proxy(socket_path: str, timeout: Optional[float]) -> xmlrpc.client.ServerProxy:
    return xmlrpc.client.ServerProxy("http://localhost/RPC2", transport=UnixTransport(socket_path, timeout))


# what talking to supervisord can raise besides OSError, for supervisor.translated()
PROTOCOL_ERRORS = (xmlrpc.client.ProtocolError, http.client.HTTPException)
Fault = xmlrpc.client.Fault
