"""`python -m services SERVICE --variant V --bind HOST:PORT ...`: run one service in the foreground.

This is what supervisord runs. Logs go to stderr, one line per event that matters; the first is
`listening PROTO HOST:PORT` with the address actually bound (so `--bind 127.0.0.1:0` is usable).
Exit status: 0 after TERM and a clean drain (or QUIT), 1 when the service cannot start (port in use...)
or the drain timed out, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import ipaddress
import os
import sys
from typing import List, Optional, Sequence, Tuple

from services.addr import SERVICES, VARIANTS, parse_bind
from services.drivers.runtime import (
    Settings,
    bind,
    block_stop_signals,
    format_address,
    make_logger,
    raise_fd_limit,
)
from services.errors import AddressError, BindError, ConfigError, ServiceError
from services.protocol.echo import LOOPBACK

DRIVERS = {
    "threaded": "services.drivers.threaded",
    "prefork": "services.drivers.prefork",
    "selectors": "services.drivers.selectors_loop",
    "asyncio": "services.drivers.asyncio_loop",
}


def _bind_arg(value: str) -> tuple:
    """--bind: HOST:PORT, port 0 = any free port (services.addr.parse_bind)."""
    try:
        return parse_bind(value, allow_zero=True)
    except AddressError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m services", description="Run one sockops service in the foreground."
    )
    p.add_argument(
        "service", choices=sorted(SERVICES), metavar="SERVICE", help="tcp-echo | udp-echo | transfer"
    )
    p.add_argument(
        "--variant", choices=VARIANTS, default="selectors", help="concurrency model (default: selectors)"
    )
    p.add_argument("--bind", type=_bind_arg, required=True, metavar="HOST:PORT", help="address to listen on")
    p.add_argument(
        "--workers", type=int, default=0, help="prefork: worker processes (default 0: one per CPU)"
    )
    p.add_argument("--root", default="", help="transfer: the directory to serve (required for transfer)")
    p.add_argument(
        "--max-conns",
        type=int,
        default=4096,
        help="connection cap per process (prefork: per worker); at the cap the connection idle longest is "
        "closed to make room, a new one is refused only when every connection is busy (default 4096)",
    )
    p.add_argument(
        "--max-conns-per-ip",
        type=int,
        default=0,
        help="connections one client address may hold per process; more are refused (default 0: no limit)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=300.0,
        help="close connections without a complete request for this long, seconds (default 300; 0: never)",
    )
    p.add_argument(
        "--request-timeout",
        type=float,
        default=30.0,
        help="a request that has begun must be complete within this, seconds (default 30; 0: no limit)",
    )
    p.add_argument(
        "--udp-rate",
        type=float,
        default=2000.0,
        help="udp-echo: datagrams a second answered per source address, token bucket; the rest are dropped "
        "and counted (default 2000; 0: no limit)",
    )
    p.add_argument(
        "--udp-burst", type=float, default=0.0, help="udp-echo: bucket size (default 0: twice --udp-rate)"
    )
    p.add_argument(
        "--udp-rate-exempt",
        default=",".join(LOOPBACK),
        metavar="CIDR,...",
        help="udp-echo: source networks never rate-limited (default: loopback; 'none': no exemption)",
    )
    p.add_argument(
        "--stats-file",
        default="",
        metavar="PATH",
        help="udp-echo: keep the drop counters in this JSON file (mode 0640, rewritten at most once a "
        "second) for the exporter; its directory must be writable (default: none)",
    )
    p.add_argument("--backlog", type=int, default=1024, help="listen backlog (default 1024)")
    p.add_argument("--reuse-port", action="store_true", help="SO_REUSEPORT: start next to a running instance")
    p.add_argument(
        "--drain-timeout",
        type=float,
        default=5.0,
        help="TERM: seconds in-flight requests get to finish (default 5; prefork master: +2)",
    )
    p.add_argument(
        "--loop", choices=("asyncio", "uvloop"), default="asyncio", help="asyncio variant: event loop"
    )
    return p


def _number_problems(args: argparse.Namespace) -> List[str]:
    checks = [
        (args.workers < 0, f"--workers {args.workers}: must be 0 (one per CPU) or more"),
        (args.max_conns < 1, f"--max-conns {args.max_conns}: must be at least 1"),
        (
            args.max_conns_per_ip < 0,
            f"--max-conns-per-ip {args.max_conns_per_ip}: must be 0 (no limit) or more",
        ),
        (args.idle_timeout < 0, f"--idle-timeout {args.idle_timeout:g}: must be 0 (never) or more seconds"),
        (
            args.request_timeout < 0,
            f"--request-timeout {args.request_timeout:g}: must be 0 (no limit) or more seconds",
        ),
        (args.udp_rate < 0, f"--udp-rate {args.udp_rate:g}: must be 0 (no limit) or more datagrams a second"),
        (args.udp_burst < 0, f"--udp-burst {args.udp_burst:g}: must be 0 (twice the rate) or more"),
        (args.backlog < 1, f"--backlog {args.backlog}: must be at least 1 (128 or more recommended)"),
        (args.drain_timeout < 0, f"--drain-timeout {args.drain_timeout:g}: must be 0 or more seconds"),
    ]
    return [message for bad, message in checks if bad]


def _other_problems(args: argparse.Namespace) -> List[str]:
    problems = []  # type: List[str]
    if args.service == "transfer" and not args.root:
        problems.append("transfer needs --root DIR: the directory whose files it serves")
    elif args.service == "transfer" and not os.path.isdir(args.root):
        problems.append(f"--root {args.root}: not a directory; create it or point at the files to serve")
    for net in _exempt_networks(args.udp_rate_exempt):
        try:
            ipaddress.ip_network(net)
        except ValueError:
            problems.append(f"--udp-rate-exempt: {net!r} is not a network (e.g. 127.0.0.0/8,::1/128 or none)")
    if args.loop == "uvloop" and args.variant != "asyncio":
        problems.append("--loop uvloop only applies to --variant asyncio")
    elif args.loop == "uvloop" and importlib.util.find_spec("uvloop") is None:
        problems.append("--loop uvloop: uvloop is not installed (pip install uvloop) - or drop the flag")
    return problems


def _exempt_networks(value: str) -> Tuple[str, ...]:
    """--udp-rate-exempt: comma-separated CIDRs, or 'none'.

    >>> _exempt_networks("127.0.0.0/8, ::1/128"), _exempt_networks("none")
    (('127.0.0.0/8', '::1/128'), ())
    """
    if value.strip().lower() == "none":
        return ()
    return tuple(part.strip() for part in value.split(",") if part.strip())


def validate(args: argparse.Namespace) -> Settings:
    """Typed settings from parsed flags; ConfigError says which flag is wrong and what would be right."""
    problems = _number_problems(args) + _other_problems(args)
    if problems:
        raise ConfigError("; ".join(problems))
    root = os.path.realpath(args.root) if args.service == "transfer" else ""
    host, port = args.bind
    return Settings(
        service=args.service,
        variant=args.variant,
        host=host,
        port=port,
        workers=args.workers,
        root=root,
        max_conns=args.max_conns,
        max_conns_per_ip=args.max_conns_per_ip,
        idle_timeout=args.idle_timeout,
        request_timeout=args.request_timeout,
        udp_rate=args.udp_rate,
        udp_burst=args.udp_burst,
        udp_rate_exempt=_exempt_networks(args.udp_rate_exempt),
        backlog=args.backlog,
        reuse_port=args.reuse_port,
        drain_timeout=args.drain_timeout,
        loop=args.loop,
        stats_file=os.path.abspath(args.stats_file) if args.stats_file else "",
    )


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = validate(args)
    except ConfigError as exc:
        print(f"python -m services: error: {exc}", file=sys.stderr)
        return 2
    log = make_logger(settings)
    block_stop_signals()  # each driver unblocks them once its handlers are installed
    try:
        driver = importlib.import_module(DRIVERS[settings.variant])
        raise_fd_limit(log, settings.max_conns)
        sock = bind(settings)
    except BindError as exc:
        log.error("%s", exc)
        return 1
    extra = f" root {settings.root}" if settings.root else ""
    log.info("listening %s %s%s", settings.proto, format_address(sock.getsockname()), extra)
    try:
        return int(driver.serve(sock, settings, log))
    except ServiceError as exc:
        log.error("%s", exc)
        return 1
    except KeyboardInterrupt:  # Ctrl-C before the driver installed its handlers
        return 0


if __name__ == "__main__":
    sys.exit(main())
