"""transfer core: length-prefixed JSON frames in, reply frames (and file bodies to send) out.

Every message, both directions, is a frame: a 4-byte big-endian length, that many bytes of a UTF-8 JSON
object (the header), then for a `get` reply exactly `size` body bytes. Framing (`FrameReader`,
`TransferConnection`) and the per-connection `TransferCore` are pure: the core answers what it can decide
from the bytes (bad frames, bad paths) and hands every other request to the driver as an event, which
answers it with services.files.FileRoot - the only code that touches the filesystem. Bodies are described
(`FileBody`), not read, so drivers can sendfile them.
"""

from __future__ import annotations

import json
import re
import stat
import struct
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Union

from services.errors import ProtocolError

HEADER_LIMIT = 64 * 1024
PREFIX = struct.Struct(">I")
OPS = ("get", "list")
# A request header is one flat object; deeper nesting is an attack on the parser, answered `bad-header`.
MAX_DEPTH = 16
# Linux's PATH_MAX; also keeps every reply header (which repeats the path) far below HEADER_LIMIT.
PATH_LIMIT = 4096
_SPECIAL = re.compile(rb'["\\\[\]{}]')


# ---- events ----------------------------------------------------------------------------------------------


class _NeedData:
    """Marker: the buffered bytes do not hold a whole frame yet."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()


@dataclass(frozen=True)
class Frame:
    """A whole frame's header, decoded (any JSON object)."""

    header: Dict[str, Any]


@dataclass(frozen=True)
class GetRequest:
    path: str


@dataclass(frozen=True)
class ListRequest:
    path: str


@dataclass(frozen=True)
class BadFrame:
    """A frame that cannot be served. `fatal`: the stream cannot be resynchronised; close after replying."""

    code: str
    message: str
    fatal: bool = False


FileRequest = Union[GetRequest, ListRequest]
Request = FileRequest


# ---- framing ---------------------------------------------------------------------------------------------


def encode_frame(header: Dict[str, Any]) -> bytes:
    """One frame's bytes. ASCII JSON, so file names that are not valid UTF-8 still encode.

    >>> encode_frame({"op": "list", "path": "."})
    b'\\x00\\x00\\x00\\x18{"op":"list","path":"."}'
    """
    raw = json.dumps(header, separators=(",", ":")).encode("ascii")
    if len(raw) > HEADER_LIMIT:
        raise ProtocolError(f"frame header of {len(raw)} bytes exceeds the {HEADER_LIMIT}-byte limit")
    return PREFIX.pack(len(raw)) + raw


def nesting_depth(raw: bytes, limit: int = MAX_DEPTH) -> int:
    """How deep JSON text nests arrays and objects, counted up to limit + 1 (strings are skipped).

    Linear in the input and without recursion, so it can vet a hostile header before json.loads (whose C
    parser recurses once per level: deep enough, and it raises RecursionError or exhausts a small thread
    stack).

    >>> nesting_depth(b'{"a": [1, {"b": "[[[["}]}')
    3
    >>> nesting_depth(b"[" * 60000)
    17
    """
    depth = deepest = 0
    in_string = False
    skip = -1
    for match in _SPECIAL.finditer(raw):
        i = match.start()
        if i == skip:  # the character after a backslash inside a string: escaped
            continue
        c = raw[i]
        if in_string:
            if c == 0x5C:
                skip = i + 1
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in (0x5B, 0x7B):
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > limit:
                    break
        else:
            depth -= 1
    return deepest


def decode_header(raw: bytes) -> "Union[Dict[str, Any], BadFrame]":  # noqa: UP037
    """A frame's header bytes as a dict, or the BadFrame that answers them.

    >>> decode_header(b'{"op":"get"}')
    {'op': 'get'}
    >>> decode_header(b'[1]').code
    'bad-header'
    >>> decode_header(b'{"a":' * 5000).message
    'header nests deeper than 16 levels'
    """
    # Counting brackets is C speed; only a header with many of them pays for the exact scan.
    if raw.count(b"[") + raw.count(b"{") > MAX_DEPTH and nesting_depth(raw) > MAX_DEPTH:
        return BadFrame("bad-header", f"header nests deeper than {MAX_DEPTH} levels")
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        return BadFrame("bad-header", f"header is not UTF-8 JSON: {exc.__class__.__name__}: {str(exc)[:200]}")
    if not isinstance(value, dict):
        return BadFrame("bad-header", f"header must be a JSON object, got {type(value).__name__}")
    return value


class FrameReader:
    """Buffers bytes and yields whole frames (h11's receive_data/next_event split).

    >>> r = FrameReader()
    >>> r.receive_data(encode_frame({"a": 1})[:3])
    >>> r.next_event()
    NEED_DATA
    >>> r.receive_data(encode_frame({"a": 1})[3:])
    >>> r.next_event()
    Frame(header={'a': 1})
    """

    __slots__ = ("_buf", "_limit", "broken")

    def __init__(self, limit: int = HEADER_LIMIT) -> None:
        self._buf = bytearray()
        self._limit = limit
        self.broken = False

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def receive_data(self, data: bytes) -> None:
        if not self.broken:
            self._buf += data

    def take(self, count: int) -> Optional[bytes]:
        """The next `count` raw bytes (a body), or None while fewer are buffered."""
        if len(self._buf) < count:
            return None
        chunk = bytes(self._buf[:count])
        del self._buf[:count]
        return chunk

    def next_event(self) -> "Union[Frame, BadFrame, _NeedData]":  # noqa: UP037
        if self.broken or len(self._buf) < PREFIX.size:
            return NEED_DATA
        (length,) = PREFIX.unpack_from(self._buf)
        if length > self._limit:
            # Skipping a multi-gigabyte claim is not worth it: answer once and close.
            self.broken = True
            self._buf.clear()
            return BadFrame(
                "header-too-long", f"header length {length} exceeds the {self._limit}-byte limit", fatal=True
            )
        end = PREFIX.size + length
        if len(self._buf) < end:
            return NEED_DATA
        raw = bytes(self._buf[PREFIX.size : end])
        del self._buf[:end]
        header = decode_header(raw)
        if isinstance(header, BadFrame):
            return header  # the length prefix was fine, so the stream is still in sync
        return Frame(header)


def parse_request(header: Dict[str, Any]) -> "Union[Request, BadFrame]":  # noqa: UP037
    """Validate a request header.

    >>> parse_request({"op": "get", "path": "a.txt"})
    GetRequest(path='a.txt')
    >>> parse_request({"op": "put", "path": "a"}).code
    'unknown-op'
    >>> parse_request({"op": "list"}).code
    'missing-field'
    """
    op = header.get("op")
    if op is None:
        return BadFrame("missing-field", "request header needs an 'op' field: 'get' or 'list'")
    if op not in OPS:
        return BadFrame("unknown-op", f"unknown op {shown(str(op), 50)}; known: get, list")
    if "path" not in header:
        return BadFrame("missing-field", f"{op} request needs a 'path' field")
    path = header["path"]
    if not isinstance(path, str):
        return BadFrame("bad-field", f"'path' must be a string, got {type(path).__name__}")
    return GetRequest(path) if op == "get" else ListRequest(path)


class TransferConnection:
    """Server side framing: bytes in, Request / BadFrame events out."""

    __slots__ = ("_reader",)

    def __init__(self, limit: int = HEADER_LIMIT) -> None:
        self._reader = FrameReader(limit)

    @property
    def idle(self) -> bool:
        return self._reader.buffered == 0

    def receive_data(self, data: bytes) -> None:
        self._reader.receive_data(data)

    def next_event(self) -> "Union[Request, BadFrame, _NeedData]":  # noqa: UP037
        event = self._reader.next_event()
        if isinstance(event, Frame):
            return parse_request(event.header)
        return event


# ---- what the core asks the driver for ---------------------------------------------------------------------


@dataclass(frozen=True)
class FileBody:
    """A reply body: `size` bytes of the file at `path` (already resolved inside the root).

    Drivers open it when its turn comes (services.files.open_body, so queued replies hold no descriptors) and
    sendfile it; opening refuses a file swapped or resized since the header was made (it promised `size`).
    """

    path: str
    size: int
    dev: int
    ino: int


@dataclass(frozen=True)
class Rejected:
    """Why a path cannot be served: an error code and message for the reply."""

    code: str
    message: str


def shown(path: str, limit: int = 200) -> str:
    """A path quoted for an error message, cut short: replies must fit the header limit whatever was sent.

    >>> shown("a/b")
    "'a/b'"
    >>> len(shown("x" * 10000)) < 250
    True
    """
    if len(path) <= limit:
        return repr(path)
    return f"{path[:limit]!r}... ({len(path)} characters)"


def check_relative(path: str) -> Optional[Rejected]:
    """Reject what can never be inside the root, before touching the filesystem.

    >>> check_relative("a/b.txt") is None
    True
    >>> check_relative("/etc/passwd").code
    'bad-path'
    >>> check_relative("a/../../x").code
    'bad-path'
    """
    if len(path) > PATH_LIMIT:
        return Rejected("bad-path", f"path of {len(path)} characters refused: the limit is {PATH_LIMIT}")
    if "\x00" in path:
        return Rejected("bad-path", "path contains a NUL byte")
    if path.startswith("/"):
        return Rejected("bad-path", f"absolute path {shown(path)} refused; paths are relative to the root")
    if ".." in path.split("/"):
        return Rejected("bad-path", f"path {shown(path)} refused: '..' components are not allowed")
    return None


def entry_type(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    return "other"


def error_header(op: str, code: str, message: str) -> Dict[str, Any]:
    return {"op": op, "error": code, "message": message}


def encode_list(header: Dict[str, Any], limit: int = HEADER_LIMIT) -> bytes:
    """A list reply frame; a directory too big for one header is cut, with `truncated` and `total` set.

    >>> big = {"op": "list", "path": ".", "entries": [{"name": "f%05d" % i, "type": "file", "size": 1}
    ...                                               for i in range(5000)]}
    >>> frame = encode_list(big)
    >>> len(frame) <= 4 + HEADER_LIMIT, json.loads(frame[4:])["truncated"], json.loads(frame[4:])["total"]
    (True, True, 5000)
    """
    try:
        return encode_frame(header)
    except ProtocolError:
        pass
    entries = header["entries"]
    keep = len(entries)
    while True:
        size = len(json.dumps(header, separators=(",", ":")))
        keep = max(0, keep * (limit - 256) // size - 1)
        cut = dict(header, entries=entries[:keep], truncated=True, total=len(entries))
        try:
            return encode_frame(cut)
        except ProtocolError:
            header = cut


# ---- the per-connection core the drivers run -------------------------------------------------------------

# What receive_data returns, in request order: a reply frame to send as is, or a request the driver answers
# with services.files.FileRoot (the core never touches the filesystem).
Output = Union[bytes, FileRequest]


class TransferCore:
    """One connection's transfer server: bytes in, reply frames and file requests out, in order.

    >>> core = TransferCore()
    >>> out = core.receive_data(encode_frame({"op": "get", "path": "a.txt"}) + encode_frame({"op": "get"}))
    >>> out[0], json.loads(out[1][4:])["error"]
    (GetRequest(path='a.txt'), 'missing-field')
    """

    __slots__ = ("_conn", "closing")

    def __init__(self, limit: int = HEADER_LIMIT) -> None:
        self._conn = TransferConnection(limit)
        self.closing = False

    @property
    def idle(self) -> bool:
        return self._conn.idle

    def receive_data(self, data: bytes) -> List[Output]:
        if self.closing:
            return []
        self._conn.receive_data(data)
        out = []  # type: List[Output]
        while True:
            event = self._conn.next_event()
            if event is NEED_DATA:
                return out
            if isinstance(event, BadFrame):
                out.append(encode_frame(error_header("", event.code, event.message)))
                if event.fatal:
                    self.closing = True
                    return out
                continue
            rejected = check_relative(event.path)
            if rejected is not None:
                op = "get" if isinstance(event, GetRequest) else "list"
                out.append(encode_frame(error_header(op, rejected.code, rejected.message)))
            else:
                out.append(event)
