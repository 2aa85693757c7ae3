"""The network services sockops deploys (shipped to hosts: Python 3.7+, standard library only).

    python -m services SERVICE --variant V --bind HOST:PORT [--workers N] [--root DIR] [--max-conns N]
        [--idle-timeout S] [--backlog N] [--reuse-port] [--drain-timeout S] [--loop asyncio|uvloop]
    python -m services.client {tcp-echo,udp-echo} HOST:PORT [TEXT]
    python -m services.client transfer HOST:PORT {list [PATH] | get PATH [-o FILE]}

Layout: `protocol/` holds one sans-IO core per service (bytes in, replies out, no sockets); `drivers/`
runs any core over sockets (threaded, prefork, selectors, asyncio; `runtime` is what they share);
`client` is the blocking client that probes, the deploy health gate, benchmarks and tests use;
`errors.ServiceError` is the package's one root error.
"""
