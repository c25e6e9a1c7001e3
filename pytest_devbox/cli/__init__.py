"""The devbox command: one module per group of subcommands."""
