"""Sans-IO protocol cores: bytes in, replies out; no sockets anywhere (see h11).

Every stream core offers the same small surface so that one driver runs any of them:
`receive_data(data) -> list of outputs` (bytes, or a `FileBody` the driver may sendfile), `closing`
(close after the outputs are flushed: the stream cannot be resynchronised) and `idle` (no partial request
buffered, so a draining server may close the connection without cutting a request in half).
"""
