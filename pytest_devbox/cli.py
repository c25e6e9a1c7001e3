"""The devbox command (work in progress)."""

def main() -> int:
    return 0
