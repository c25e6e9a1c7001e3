"""One guest: the handle, its boot and restore, readiness, where it runs, sync, sweep."""
