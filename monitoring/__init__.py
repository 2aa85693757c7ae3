"""Host-side monitors: kernel and psutil collectors, probes, pure renderers (shipped to hosts: Python 3.7+)."""
