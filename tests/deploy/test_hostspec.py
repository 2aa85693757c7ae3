"""deploy.hostspec: `--host` lists and host strings (issue 14, "From the operator").

Through a real sshd: `user@[::1]:port` and the `[host]:port` changed-key hint are in test_jump.py (they need
the test host behind a bastion); here the parser itself and `connect()` against real sockets on loopback.
"""

from __future__ import annotations

import doctest
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from deploy import hostspec
from deploy.errors import ConfigError, DeployError, HostError
from deploy.hosts import connect
from deploy.hostspec import HostSpec, host_list, parse_host

SOCKOPS = Path(sys.executable).with_name("sockops")


def test_doctests():
    result = doctest.testmod(hostspec)
    assert result.failed == 0
    assert result.attempted >= 5


@pytest.mark.parametrize(
    ("text", "spec"),
    [
        ("web1", HostSpec("web1")),
        ("root@web1", HostSpec("web1", "root")),
        ("root@127.0.0.1:2222", HostSpec("127.0.0.1", "root", 2222)),
        ("127.0.0.1:22", HostSpec("127.0.0.1", None, 22)),
        ("::1", HostSpec("::1")),
        ("2001:db8::5", HostSpec("2001:db8::5")),
        ("fe80::1%eth0", HostSpec("fe80::1%eth0")),
        ("[::1]", HostSpec("::1")),
        ("[::1]:22", HostSpec("::1", None, 22)),
        ("user@[::1]:2222", HostSpec("::1", "user", 2222)),
        ("[web1]:2200", HostSpec("web1", None, 2200)),  # OpenSSH accepts brackets around any host
        ("deploy@web1.example.com:65535", HostSpec("web1.example.com", "deploy", 65535)),
    ],
)
def test_host_strings_parse(text, spec):
    assert parse_host(text) == spec


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("root@127.0.0.1:abc", "port 'abc' is not a number from 1 to 65535"),
        ("web1:0", "port '0' is not a number"),
        ("web1:65536", "port '65536' is not a number"),
        ("web1:", "port '' is not a number"),
        ("[::1]:x", "port 'x' is not a number"),
        ("@web1", "empty user name before '@'"),
        ("", "no host name in it"),
        (":22", "no host name in it"),
        ("root@", "no host name in it"),
        ("[]:22", "no host name in it"),
        ("a:b:c", "'a:b:c' is not an IPv6 address; for a port write [v6]:port"),
        ("::1:2222:x", "is not an IPv6 address"),
        ("[a:b]:22", "'a:b' is not a host name or address"),
        ("we b1", "'we b1' is not a host name or address"),
        ("[::1]x", "is not an IPv6 address"),
    ],
)
def test_bad_host_strings_are_one_line_errors(text, error):
    with pytest.raises(ConfigError) as info:
        parse_host(text)
    assert error in str(info.value)
    assert str(info.value).startswith(f"host {text!r}: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("flags", "hosts"),
    [
        ([], ["local"]),
        (None, ["local"]),
        (["local"], ["local"]),
        (["web1"], ["web1"]),
        (["web1,web2", " web3 "], ["web1", "web2", "web3"]),
        (["root@[::1]:2222,::1"], ["root@[::1]:2222", "::1"]),
    ],
)
def test_host_lists(flags, hosts):
    assert host_list(flags) == hosts


@pytest.mark.parametrize("flags", [[""], [","], [" "], ["web1,,web2"], ["web1,"], ["web1", ""]])
def test_an_empty_host_is_an_error_never_local(flags):
    with pytest.raises(ConfigError, match=r"^--host .*: empty host name; name the hosts, or 'local'"):
        host_list(flags)


def test_a_bad_host_in_the_list_is_named():
    with pytest.raises(ConfigError, match=r"^host 'root@127\.0\.0\.1:abc': port 'abc'"):
        host_list(["web1,root@127.0.0.1:abc"])


def test_connect_refuses_a_bad_port_with_a_one_line_error():
    with pytest.raises(DeployError, match=r"^host 'root@127\.0\.0\.1:abc': port 'abc' is not a number"):
        connect("root@127.0.0.1:abc")


def _closed_port(family: socket.AddressFamily, address: str) -> int:
    with socket.socket(family) as s:
        s.bind((address, 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("template", "family", "address", "user"),
    [
        ("admin@[::1]:{port}", socket.AF_INET6, "::1", "admin"),
        ("[::1]:{port}", socket.AF_INET6, "::1", None),
        ("root@127.0.0.1:{port}", socket.AF_INET, "127.0.0.1", "root"),
    ],
    ids=["user@[v6]:port", "[v6]:port", "user@v4:port"],
)
def test_connect_goes_to_the_parsed_address_and_port(tmp_path, template, family, address, user):
    # a real connect() to a closed loopback port: the error shows where it really went
    port = _closed_port(family, address)
    text = template.format(port=port)
    empty = tmp_path / "ssh_config"
    empty.write_text("")
    c = connect(text, ssh_config=empty)
    assert (c.host, c.port) == (address, port)
    if user:
        assert c.user == user
    with pytest.raises(HostError) as info:
        c.run("true")
    assert str(info.value).startswith(f"{text} ({c.user}@{address}:{port}): cannot connect")


def test_bare_ipv6_literal_is_a_host_on_port_22(tmp_path):
    empty = tmp_path / "ssh_config"
    empty.write_text("")
    c = connect("::1", ssh_config=empty)
    assert (c.host, c.port) == ("::1", 22)


@pytest.mark.parametrize("value", ["", ","], ids=["empty", "comma"])
def test_sockops_refuses_an_empty_host_instead_of_deploying_locally(tmp_path, value):
    # `--dry-run`: even if the empty list still meant "local", nothing on this machine would change
    proc = subprocess.run(
        [str(SOCKOPS), "deploy", "--dry-run", "--host", value],
        cwd=tmp_path,
        env={**os.environ, "HOME": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    assert f"sockops: --host {value!r}: empty host name; name the hosts, or 'local' for this machine" in (
        proc.stdout + proc.stderr
    )
    assert "[local]" not in proc.stdout
    assert "Traceback" not in proc.stdout + proc.stderr
