"""Developer tooling: disposable SSH test hosts and benchmarks.

Used by the tests and by `invoke testhosts.*` / `invoke bench`; never imported by a production path and never
shipped to a host (the host wheel holds services/, monitoring/ and hostctl/ only).
"""
