"""egress-router: relays pod traffic to outside servers from one reserved source IP."""

__version__ = "0.1.0"
