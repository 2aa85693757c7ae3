"""Sans-IO protocol cores: bytes in, replies out; no sockets anywhere (see h11).

Every stream core offers the same small surface so that one driver runs any of them:
`receive_data(data) -> list of outputs` (bytes to send, or for transfer a file request the driver answers
with services.files, which does every filesystem access), `closing`
(close after the outputs are flushed: the stream cannot be resynchronised) and `idle` (no partial request
buffered, so a draining server may close the connection without cutting a request in half).
"""
