"""pytest hooks and fixtures (work in progress)."""
