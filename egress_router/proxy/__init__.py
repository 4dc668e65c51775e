"""The proxy modes (HTTP, TCP, DNS) and the access rules they enforce."""
