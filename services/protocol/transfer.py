"""transfer core: length-prefixed JSON frames in, reply frames (and file bodies to send) out.

Every message, both directions, is a frame: a 4-byte big-endian length, that many bytes of a UTF-8 JSON
object (the header), then for a `get` reply exactly `size` body bytes. Framing (`FrameReader`,
`TransferConnection`) is pure; `FileRoot` answers requests from one directory and is the only place that
touches the filesystem. Bodies are described (`FileBody`), not read, so drivers can sendfile them.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import struct
from dataclasses import dataclass
from typing import IO, Any, Dict, List, Optional, Tuple, Union

from services.errors import ProtocolError

HEADER_LIMIT = 64 * 1024
PREFIX = struct.Struct(">I")
OPS = ("get", "list")
_HASH_CHUNK = 1 << 20
_HASH_CACHE_LIMIT = 4096


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


Request = Union[GetRequest, ListRequest]


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


def decode_header(raw: bytes) -> "Union[Dict[str, Any], BadFrame]":  # noqa: UP037
    """A frame's header bytes as a dict, or the BadFrame that answers them.

    >>> decode_header(b'{"op":"get"}')
    {'op': 'get'}
    >>> decode_header(b'[1]').code
    'bad-header'
    """
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return BadFrame("bad-header", f"header is not UTF-8 JSON: {exc}")
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


# ---- the file root ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileBody:
    """A reply body: `size` bytes of the file at `path` (already resolved inside the root).

    Drivers open it when its turn comes (so queued replies hold no descriptors) and sendfile it; `open`
    refuses a file that was swapped or changed size since the header was made (the header promised `size`).
    """

    path: str
    size: int
    dev: int
    ino: int

    def open(self) -> IO[bytes]:
        fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) != (self.dev, self.ino) or st.st_size < self.size:
                raise ProtocolError(f"{self.path} changed while being served; closing the connection")
            return os.fdopen(fd, "rb", buffering=0)
        except BaseException:
            os.close(fd)
            raise


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


class FileRoot:
    """Answers get/list requests from one directory; nothing outside it is ever read."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self._hashes = {}  # type: Dict[Tuple[int, int, int, int], str]

    def resolve(self, path: str) -> "Union[str, Rejected]":  # noqa: UP037
        """The real path of `path` inside the root, or why not (symlinks are followed, then checked)."""
        rejected = check_relative(path)
        if rejected is not None:
            return rejected
        real = os.path.realpath(os.path.join(self.root, path))
        if real != self.root and not real.startswith(self.root + os.sep):
            return Rejected("forbidden", f"path {shown(path)} resolves outside the served root")
        return real

    def sha256(self, body: FileBody, mtime_ns: int) -> str:
        key = (body.dev, body.ino, body.size, mtime_ns)
        digest = self._hashes.get(key)
        if digest is None:
            h = hashlib.sha256()
            with body.open() as f:
                left = body.size
                while left:
                    chunk = f.read(min(_HASH_CHUNK, left))
                    if not chunk:
                        raise ProtocolError(f"{body.path} shrank while being hashed")
                    h.update(chunk)
                    left -= len(chunk)
            digest = h.hexdigest()
            if len(self._hashes) >= _HASH_CACHE_LIMIT:
                self._hashes.clear()
            self._hashes[key] = digest
        return digest

    def get(self, path: str) -> Tuple[Dict[str, Any], Optional[FileBody]]:
        real = self.resolve(path)
        if isinstance(real, Rejected):
            return error_header("get", real.code, real.message), None
        try:
            st = os.stat(real)
            if not stat.S_ISREG(st.st_mode):
                return error_header("get", "not-a-file", f"{shown(path)} is a {entry_type(st.st_mode)}"), None
            body = FileBody(real, st.st_size, st.st_dev, st.st_ino)
            digest = self.sha256(body, st.st_mtime_ns)
        except FileNotFoundError:
            return error_header("get", "not-found", f"no such file: {shown(path)}"), None
        except (PermissionError, ProtocolError) as exc:
            return error_header(
                "get", "unreadable", f"cannot read {shown(path)}: {exc.__class__.__name__}"
            ), None
        except OSError as exc:
            return error_header("get", "not-found", f"cannot open {shown(path)}: {exc.strerror}"), None
        name = os.path.basename(path.rstrip("/")) or os.path.basename(real)  # a symlink keeps its own name
        header = {"op": "get", "path": path, "filename": name, "size": body.size, "sha256": digest}
        return header, body

    def list(self, path: str) -> Dict[str, Any]:
        real = self.resolve(path)
        if isinstance(real, Rejected):
            return error_header("list", real.code, real.message)
        try:
            if not os.path.isdir(real):
                if os.path.lexists(real):
                    return error_header("list", "not-a-directory", f"{shown(path)} is not a directory")
                return error_header("list", "not-found", f"no such directory: {shown(path)}")
            entries = []
            with os.scandir(real) as it:
                for entry in it:
                    st = entry.stat(follow_symlinks=False)
                    entries.append({"name": entry.name, "type": entry_type(st.st_mode), "size": st.st_size})
        except PermissionError:
            return error_header("list", "unreadable", f"cannot list {shown(path)}: permission denied")
        except OSError as exc:
            return error_header("list", "not-found", f"cannot list {shown(path)}: {exc.strerror}")
        entries.sort(key=lambda e: e["name"])
        return {"op": "list", "path": path, "entries": entries}


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

Output = Union[bytes, FileBody]


class TransferCore:
    """One connection's transfer server: bytes in, reply frames and file bodies out."""

    __slots__ = ("_conn", "_files", "closing")

    def __init__(self, files: FileRoot, limit: int = HEADER_LIMIT) -> None:
        self._conn = TransferConnection(limit)
        self._files = files
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
            elif isinstance(event, GetRequest):
                header, body = self._files.get(event.path)
                out.append(encode_frame(header))
                if body is not None and body.size:  # sendfile refuses a count of 0
                    out.append(body)
            else:
                out.append(encode_list(self._files.list(event.path)))
