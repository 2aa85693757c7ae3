"""Host-side monitors: kernel/psutil collectors, probes, pure renderers (shipped to hosts, Python 3.7+)."""
