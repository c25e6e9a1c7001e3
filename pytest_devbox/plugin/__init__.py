"""The pytest face: hooks, the session, the report, xdist's broker, forensics."""
