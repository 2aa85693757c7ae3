"""The transfer service's filesystem side: what the drivers call when the core asks for a file or a listing.

The core (services.protocol.transfer) only frames and validates; every stat, scandir, open and SHA-256 is
here, run by a driver. A get is two steps so a driver can hash a big file off its event loop:
`lookup(request)` stats the file and answers at once when the digest is cached (or the request fails), else
returns a `Found` whose digest is computed by `digest(found)` (blocking, thread-safe: run it in a worker
thread) and turned into the reply by `reply(found, digest)`. `answer(request)` does all of it inline, for
drivers that have a thread per connection anyway.
"""

from __future__ import annotations

import hashlib
import os
import stat
import threading
from dataclasses import dataclass
from typing import IO, Any, Dict, List, Tuple, Union

from services.errors import ProtocolError
from services.protocol.transfer import (
    FileBody,
    FileRequest,
    GetRequest,
    Rejected,
    check_relative,
    encode_frame,
    encode_list,
    entry_type,
    error_header,
    shown,
)

HASH_CHUNK = 8 << 20
HASH_CACHE_LIMIT = 4096

Output = Union[bytes, FileBody]
DigestKey = Tuple[str, int, int, int]  # (path, size, mtime_ns, inode): a new version of a file is a new key


@dataclass(frozen=True)
class Found:
    """A get whose file exists; its reply waits for the file's SHA-256."""

    header: Dict[str, Any]  # the reply header without "sha256"
    body: FileBody
    key: DigestKey


def open_body(body: FileBody) -> IO[bytes]:
    """The body's file, opened for sendfile; refused if it was swapped or shrank since the header was made."""
    fd = os.open(body.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (body.dev, body.ino) or st.st_size < body.size:
            raise ProtocolError(f"{body.path} changed while being served; closing the connection")
        return os.fdopen(fd, "rb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def hash_body(body: FileBody) -> str:
    """SHA-256 of the body's bytes. Big chunks into one reused buffer: read and update release the GIL, and
    every chunk means getting it back from the threads serving clients (each wait up to a switch interval)."""
    h = hashlib.sha256()
    buf = memoryview(bytearray(min(HASH_CHUNK, body.size) or 1))
    with open_body(body) as f:
        left = body.size
        while left:
            got = f.readinto(buf[: min(len(buf), left)])
            if not got:
                raise ProtocolError(f"{body.path} shrank while being hashed")
            h.update(buf[:got])
            left -= got
    return h.hexdigest()


class FileRoot:
    """Answers get/list requests from one directory; nothing outside it is ever read."""

    def __init__(self, root: str) -> None:
        self.root = os.path.realpath(root)
        self._hashes = {}  # type: Dict[DigestKey, str]
        self._lock = threading.Lock()  # digest() runs in worker threads

    def resolve(self, path: str) -> Union[str, Rejected]:
        """The real path of `path` inside the root, or why not (symlinks are followed, then checked)."""
        rejected = check_relative(path)
        if rejected is not None:
            return rejected
        real = os.path.realpath(os.path.join(self.root, path))
        if real != self.root and not real.startswith(self.root + os.sep):
            return Rejected("forbidden", f"path {shown(path)} resolves outside the served root")
        return real

    # -- get, in two steps --
    def lookup(self, request: FileRequest) -> Union[List[Output], Found]:
        """The reply when it needs no hashing (a listing, an error, a cached digest), else a Found."""
        if not isinstance(request, GetRequest):
            return [encode_list(self.list(request.path))]
        found = self._stat(request.path)
        if isinstance(found, dict):
            return [encode_frame(found)]
        with self._lock:
            digest = self._hashes.get(found.key)
        return self.reply(found, digest) if digest is not None else found

    def digest(self, found: Found) -> Union[str, Dict[str, Any]]:
        """The file's SHA-256, cached; or the error header when it cannot be read. Blocking, thread-safe."""
        try:
            digest = hash_body(found.body)
        except (OSError, ProtocolError) as exc:
            return error_header(
                "get", "unreadable", f"cannot read {shown(found.header['path'])}: {exc.__class__.__name__}"
            )
        with self._lock:
            if len(self._hashes) >= HASH_CACHE_LIMIT:
                self._hashes.clear()
            self._hashes[found.key] = digest
        return digest

    @staticmethod
    def reply(found: Found, digest: Union[str, Dict[str, Any]]) -> List[Output]:
        if isinstance(digest, dict):
            return [encode_frame(digest)]
        out = [encode_frame(dict(found.header, sha256=digest))]  # type: List[Output]
        if found.body.size:  # sendfile refuses a count of 0
            out.append(found.body)
        return out

    def answer(self, request: FileRequest) -> List[Output]:
        """lookup, digest and reply inline (for a driver whose connection has its own thread)."""
        result = self.lookup(request)
        if isinstance(result, Found):
            return self.reply(result, self.digest(result))
        return result

    def _stat(self, path: str) -> Union[Found, Dict[str, Any]]:
        real = self.resolve(path)
        if isinstance(real, Rejected):
            return error_header("get", real.code, real.message)
        try:
            st = os.stat(real)
        except FileNotFoundError:
            return error_header("get", "not-found", f"no such file: {shown(path)}")
        except PermissionError as exc:
            return error_header("get", "unreadable", f"cannot read {shown(path)}: {exc.__class__.__name__}")
        except OSError as exc:
            return error_header("get", "not-found", f"cannot open {shown(path)}: {exc.strerror}")
        if not stat.S_ISREG(st.st_mode):
            return error_header("get", "not-a-file", f"{shown(path)} is a {entry_type(st.st_mode)}")
        body = FileBody(real, st.st_size, st.st_dev, st.st_ino)
        name = os.path.basename(path.rstrip("/")) or os.path.basename(real)  # a symlink keeps its own name
        header = {"op": "get", "path": path, "filename": name, "size": body.size}
        return Found(header, body, (real, st.st_size, st.st_mtime_ns, st.st_ino))

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
