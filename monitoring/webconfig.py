"""The exporter's optional TLS and basic auth, from the web-config file Prometheus' own exporters read.

The format is exporter-toolkit's (node_exporter's `--web.config.file`), the part sockops supports:

    tls_server_config:
      cert_file: exporter.crt      # relative paths are relative to this file, as in exporter-toolkit
      key_file: exporter.key
      min_version: TLS12           # optional: TLS12 (default) | TLS13
    basic_auth_users:
      prometheus: $2b$12$...       # bcrypt hashes only (htpasswd -nBC 12 "" | tr -d ':\\n')

Hosts have no YAML library, so this reads the block-mapping subset above (comments, quoted or plain scalars,
two levels); anything else, and any key exporter-toolkit knows but sockops does not implement, is refused
with the line it is on rather than ignored: a silently ignored `client_auth_type` would be a false sense of
security. Passwords are checked with the `bcrypt` module; without it, basic_auth_users is refused (never a
plaintext comparison).
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

from monitoring.errors import MonitoringError

TLS_KEYS = ("cert_file", "key_file", "min_version")
TOP_KEYS = ("tls_server_config", "basic_auth_users")
MIN_VERSIONS = ("TLS12", "TLS13")
# $2a$ / $2b$ / $2y$, a two-digit cost, 53 characters of salt and hash: what htpasswd -B and bcrypt write
_BCRYPT = re.compile(r"^\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}$")
_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z0-9_.@-]+|\"[^\"]*\"|'[^']*'):(?:[ \t]+(?P<value>.*))?$")


class WebConfigError(MonitoringError):
    """The web-config file cannot be used as written (the message names the file and line)."""


@dataclass(frozen=True)
class WebConfig:
    cert_file: str = ""  # "" = plain HTTP
    key_file: str = ""
    min_version: str = "TLS12"
    users: Mapping[str, str] = field(default_factory=dict)  # name -> bcrypt hash

    @property
    def tls(self) -> bool:
        return bool(self.cert_file)


def _scalar(text: str, where: str) -> str:
    """A plain or quoted YAML scalar without its trailing comment.

    >>> _scalar('"a b" # c', "f:1"), _scalar("$2b$12$x  # hash", "f:1"), _scalar("'it''s'", "f:1")
    ('a b', '$2b$12$x', "it's")
    """
    text = text.strip()
    if text[:1] == '"':
        end = text.find('"', 1)
        if end < 0 or text[end + 1 :].strip()[:1] not in ("", "#") or "\\" in text[1:end]:
            raise WebConfigError(f"{where}: unsupported double-quoted value (no escapes, nothing after it)")
        return text[1:end]
    if text[:1] == "'":
        match = re.match(r"'((?:[^']|'')*)'\s*(#.*)?$", text)
        if not match:
            raise WebConfigError(f"{where}: unterminated single-quoted value")
        return match.group(1).replace("''", "'")
    value = re.split(r"\s+#", text, maxsplit=1)[0].strip()
    if value[:1] in ("[", "{", "&", "*", "!", "|", ">"):
        raise WebConfigError(f"{where}: only plain or quoted scalars are supported here, not {value[:1]!r}")
    return value


def parse_blocks(text: str, where: str) -> Dict[str, Any]:
    """The two-level block-mapping subset of YAML -> {key: str | {key: str}} (pure).

    >>> parse_blocks("a:\\n  b: 1  # c\\n# x\\nd: e\\n", "f")
    {'a': {'b': '1'}, 'd': 'e'}
    """
    out: Dict[str, Any] = {}
    section: Optional[Dict[str, str]] = None
    section_indent = 0
    for number, raw in enumerate(text.splitlines(), 1):
        at = f"{where}:{number}"
        if not raw.strip() or raw.lstrip().startswith("#") or raw.strip() in ("---", "..."):
            continue
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise WebConfigError(f"{at}: tabs are not allowed for indentation in YAML")
        m = _LINE.match(raw.rstrip())
        if not m:
            raise WebConfigError(
                f"{at}: expected `key: value` or `key:` (a block mapping), got {raw.strip()!r}"
            )
        key, indent = _scalar(m.group("key"), at), len(m.group("indent"))
        value = m.group("value")
        if indent == 0:
            section = None
            if key in out:
                raise WebConfigError(f"{at}: {key!r} given twice")
            if value is None or value.strip().startswith("#"):
                section, section_indent = {}, -1
                out[key] = section
            else:
                scalar = _scalar(value, at)
                out[key] = {} if scalar in ("{}", "null", "~", "") else scalar
            continue
        if section is None or (section_indent not in (-1, indent)):
            raise WebConfigError(f"{at}: unexpected indentation (two levels of block mappings at most)")
        section_indent = indent
        if value is None:
            raise WebConfigError(f"{at}: {key!r} needs a value (nested mappings are not supported)")
        if key in section:
            raise WebConfigError(f"{at}: {key!r} given twice")
        section[key] = _scalar(value, at)
    return out


def parse(text: str, where: str, base_dir: str = "") -> WebConfig:
    """The web-config text -> WebConfig; relative cert/key paths are joined to `base_dir` (pure).

    >>> c = parse("tls_server_config:\\n  cert_file: c.pem\\n  key_file: /k.pem\\n", "w.yml", "/etc/x")
    >>> c.cert_file, c.key_file, c.tls, dict(c.users)
    ('/etc/x/c.pem', '/k.pem', True, {})
    >>> try:
    ...     parse("basic_auth_users:\\n  p: secret\\n", "w.yml")
    ... except WebConfigError as exc:
    ...     print(exc)
    w.yml: basic_auth_users.p is not a bcrypt hash ($2b$...): plaintext passwords are refused
    """
    data = parse_blocks(text, where)
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise WebConfigError(
            f"{where}: {', '.join(unknown)} not supported by sockops-exporter "
            f"(it reads {', '.join(TOP_KEYS)})"
        )
    tls = _section(data, "tls_server_config", where)
    extra = sorted(set(tls) - set(TLS_KEYS))
    if extra:
        raise WebConfigError(
            f"{where}: tls_server_config.{extra[0]} is not supported (only {', '.join(TLS_KEYS)})"
        )
    if bool(tls.get("cert_file")) != bool(tls.get("key_file")):
        raise WebConfigError(f"{where}: tls_server_config needs both cert_file and key_file")
    if tls.get("min_version", "TLS12") not in MIN_VERSIONS:
        raise WebConfigError(
            f"{where}: tls_server_config.min_version must be one of {', '.join(MIN_VERSIONS)}"
        )
    users = _section(data, "basic_auth_users", where)
    for name, hashed in users.items():
        if not _BCRYPT.match(hashed):
            raise WebConfigError(
                f"{where}: basic_auth_users.{name} is not a bcrypt hash ($2b$...): "
                "plaintext passwords are refused"
            )

    def path(p: str) -> str:
        return os.path.join(base_dir, p) if p and base_dir else p

    return WebConfig(
        cert_file=path(tls.get("cert_file", "")),
        key_file=path(tls.get("key_file", "")),
        min_version=tls.get("min_version", "TLS12"),
        users=dict(users),
    )


def _section(data: Mapping[str, Any], key: str, where: str) -> Dict[str, str]:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise WebConfigError(f"{where}: {key} must be a mapping")
    return value


def read(path: str) -> WebConfig:
    try:
        with open(path) as f:
            text = f.read()
    except OSError as exc:
        raise WebConfigError(f"--web.config.file {path}: {exc.strerror or exc}") from exc
    return parse(text, path, os.path.dirname(os.path.abspath(path)))


# --- the live side: an SSL context and a password checker --------------------------------------------------


def ssl_context(config: WebConfig) -> Any:
    """A server-side SSLContext with the configured certificate (None without TLS)."""
    if not config.tls:
        return None
    import ssl  # only an exporter with TLS pays for it

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if config.min_version == "TLS13" else ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(config.cert_file, config.key_file)
    except (OSError, ssl.SSLError) as exc:
        raise WebConfigError(
            f"tls_server_config: cannot load cert_file {config.cert_file} / key_file {config.key_file}: {exc}"
        ) from exc
    return ctx


class Passwords:
    """Checks `Authorization: Basic ...` against bcrypt hashes; a success is remembered (by SHA-256 of the
    password), because bcrypt is slow on purpose and Prometheus sends the same credentials every scrape."""

    def __init__(self, users: Mapping[str, str]) -> None:
        try:
            import bcrypt
        except ImportError as exc:
            raise WebConfigError(
                "basic_auth_users needs the `bcrypt` module, which this interpreter cannot import; "
                "install it in the exporter's venv or remove basic_auth_users (plaintext passwords are "
                "never compared)"
            ) from exc
        self._bcrypt = bcrypt
        self.users = dict(users)
        self._good: Dict[str, bytes] = {}  # user -> sha256 of the last password that matched
        self._lock = threading.Lock()

    def check(self, header: Optional[str]) -> bool:
        user, password = basic_credentials(header)
        hashed = self.users.get(user)
        if hashed is None or password is None:
            return False
        digest = hashlib.sha256(password).digest()
        with self._lock:
            if self._good.get(user) == digest:
                return True
        ok = bool(self._bcrypt.checkpw(password, hashed.encode("ascii")))
        if ok:
            with self._lock:
                self._good[user] = digest
        return ok


def basic_credentials(header: Optional[str]) -> Tuple[str, Optional[bytes]]:
    """An Authorization header -> (user, password bytes); ("", None) if it is not Basic credentials (pure).

    >>> basic_credentials("Basic " + base64.b64encode(b"prom:s3:cret").decode())
    ('prom', b's3:cret')
    >>> basic_credentials("Bearer x"), basic_credentials(None), basic_credentials("Basic !!")
    (('', None), ('', None), ('', None))
    """
    scheme, _, value = (header or "").strip().partition(" ")
    if scheme.lower() != "basic":
        return "", None
    try:
        decoded = base64.b64decode(value.strip(), validate=True)
    except ValueError:
        return "", None
    user, sep, password = decoded.partition(b":")
    if not sep:
        return "", None
    return user.decode("utf-8", "replace"), password


__all__: List[str] = ["Passwords", "WebConfig", "WebConfigError", "parse", "read", "ssl_context"]
