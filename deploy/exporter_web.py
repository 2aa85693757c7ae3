"""The exporter's TLS and basic auth as a deploy ships them (`sockops.exporter.web_config`, issue 15).

The operator points at a web-config YAML (exporter-toolkit's format, read by monitoring.webconfig, the very
loader the exporter uses). A deploy ships it and the files it references to `<paths.etc>/exporter/` on the
host, under fixed names, with the YAML rewritten to name the shipped copies:

    web.yml   tls_server_config: cert_file/key_file -> <etc>/exporter/tls.crt, tls.key; basic_auth_users kept
    tls.crt   tls.key                                  (only when the YAML has tls_server_config)

Everything here is checked on the operator before anything is shipped: the YAML parses, its files exist and
are readable, the key matches the certificate. `ShippedWebConfig.digest` (a hash of every shipped byte) goes
into the exporter's supervisord section, so a new certificate restarts the exporter and nothing else.
"""

from __future__ import annotations

import hashlib
import os
import shlex
from dataclasses import dataclass

from deploy.errors import ConfigError
from monitoring import webconfig

CONFIG_NAME = "web.yml"
CERT_NAME = "tls.crt"
KEY_NAME = "tls.key"
RELEASE_DIR = "exporter"  # inside a release: the copies `step_switch` installs into <etc>/exporter


@dataclass(frozen=True)
class ShippedWebConfig:
    """What a deploy writes to the host: {file name: content}, the YAML already naming the shipped paths."""

    source: str  # the operator's path (messages only)
    files: tuple[tuple[str, str], ...]  # (name, content), sorted

    @property
    def digest(self) -> str:
        """Hash of every shipped name and byte: changes exactly when the exporter must restart."""
        h = hashlib.sha256()
        for name, content in self.files:
            h.update(f"{name}\0{len(content)}\0{content}".encode())
        return h.hexdigest()[:16]


def host_dir(etc: str) -> str:
    """Where the exporter reads its web config on the host (beside supervisord.conf)."""
    return f"{etc}/exporter"


def host_config(etc: str) -> str:
    return f"{host_dir(etc)}/{CONFIG_NAME}"


def render(config: webconfig.WebConfig, directory: str) -> str:
    """The web-config YAML for the host: the same settings, cert and key at their shipped paths (pure).

    >>> web = webconfig.WebConfig("/op/c.pem", "/op/k.pem", "TLS13", {"p": "$2b$x"})
    >>> print(render(web, "/etc/s"), end="")
    # written by `sockops deploy` from sockops.exporter.web_config
    tls_server_config:
      cert_file: '/etc/s/tls.crt'
      key_file: '/etc/s/tls.key'
      min_version: TLS13
    basic_auth_users:
      'p': '$2b$x'
    """
    lines = ["# written by `sockops deploy` from sockops.exporter.web_config"]
    if config.tls:
        lines += [
            "tls_server_config:",
            f"  cert_file: '{directory}/{CERT_NAME}'",
            f"  key_file: '{directory}/{KEY_NAME}'",
            f"  min_version: {config.min_version}",
        ]
    if config.users:
        lines.append("basic_auth_users:")
        lines += [f"  '{user}': '{hashed}'" for user, hashed in sorted(config.users.items())]
    return "".join(line + "\n" for line in lines)


def _read(path: str, what: str, at: str) -> str:
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except OSError as exc:
        raise ConfigError(f"{at}: {what} {path}: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{at}: {what} {path} is not a PEM text file") from exc


def where(path: str) -> str:
    """The prefix of every message about the operator's web config."""
    return f"sockops.exporter.web_config {path}: "


def load(path: str, etc: str) -> ShippedWebConfig:
    """Check the operator's web config the way the exporter will, and prepare its shipped copies.

    Raises ConfigError, one line naming the file and the problem.
    """
    at = where(path)[:-2]
    if not os.path.isabs(path):
        raise ConfigError(f"{at}: must be an absolute path")
    try:
        config = webconfig.read(path)
    except webconfig.WebConfigError as exc:
        raise ConfigError(f"{at}: {exc}") from exc
    if any(c in "".join(config.users) for c in "'\":#"):
        raise ConfigError(f"{at}: basic_auth_users names must not contain quotes, ':' or '#'")
    directory = host_dir(etc)
    files = {CONFIG_NAME: render(config, directory)}
    if config.tls:
        files[CERT_NAME] = _read(config.cert_file, "cert_file", at)
        files[KEY_NAME] = _read(config.key_file, "key_file", at)
        try:
            webconfig.ssl_context(config)  # the certificate and key load and belong together
        except webconfig.WebConfigError as exc:
            raise ConfigError(f"{at}: {exc}") from exc
    # the shipped YAML must mean what the operator's does: read it back with the exporter's own parser
    again = webconfig.parse(files[CONFIG_NAME], f"{directory}/{CONFIG_NAME}", directory)
    if (again.min_version, dict(again.users), again.tls) != (
        config.min_version,
        dict(config.users),
        config.tls,
    ):
        raise ConfigError(f"{at}: cannot be rewritten faithfully for the host")  # a bug, never silent
    return ShippedWebConfig(source=path, files=tuple(sorted(files.items())))


def release_files(shipped: ShippedWebConfig, rdir: str) -> dict[str, tuple[str, str]]:
    """{path in the release: (content, mode)} for deploy.steps.write_files_script: root-only copies."""
    return {f"{rdir}/{RELEASE_DIR}/{name}": (content, "0600") for name, content in shipped.files}


def keep_private_script(rdir: str) -> str:
    """Shell that makes the release's copies root-only again (after a repair's `chmod -R a+rX` of it)."""
    src = shlex.quote(f"{rdir}/{RELEASE_DIR}")
    return f"[ ! -d {src} ] || chmod -R go= {src}"


def install_script(rdir: str, etc: str, group: str) -> str:
    """Shell for the switch: the release's copies into <etc>/exporter, 0640 root:`group`, each file atomically
    (tmp + rename); a release without them leaves no stale TLS files behind."""
    q, src, dst = shlex.quote, f"{rdir}/{RELEASE_DIR}", host_dir(etc)
    return (
        f"if [ -d {q(src)} ]; then install -d -m 0750 -o root -g {q(group)} {q(dst)}; "
        f'for f in {q(src)}/*; do n=$(basename "$f"); '
        f'install -m 0640 -o root -g {q(group)} "$f" {q(dst)}/."$n".sockops-tmp; '
        f'mv -f {q(dst)}/."$n".sockops-tmp {q(dst)}/"$n"; done; '
        f"else rm -rf {q(dst)}; fi\n"
    )
