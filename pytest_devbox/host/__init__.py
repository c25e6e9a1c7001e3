"""Probes of this host, the cache layout, atomic writes and capacity: the lowest layer."""
