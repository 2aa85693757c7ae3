"""The network services sockops deploys (shipped to hosts: Python 3.7+, standard library only)."""
