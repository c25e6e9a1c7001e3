"""`python -m pytest_devbox.cli`: the devbox command."""

from .main import main

raise SystemExit(main())
