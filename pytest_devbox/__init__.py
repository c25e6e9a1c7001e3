"""pytest-devbox: run the same tests in disposable VMs, one per Linux distribution."""
