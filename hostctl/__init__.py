"""The host control program: applies a release to sockops' supervisord on a host (runs ON the host).

Shipped in the host wheel beside services/ and monitoring/ and run as `<release>/venv/bin/python -m hostctl`;
Python 3.7+, standard library and the supervisor package only.
"""
