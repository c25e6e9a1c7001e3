"""A session's guests: shared per distro, fresh per test, kept, reused."""
