"""How the package reports progress: a `Log` takes one line of text.

The plugin passes a writer that suspends pytest's capture; the CLI passes `print`; tests
pass `list.append`.
"""

from __future__ import annotations

from typing import Callable

Log = Callable[[str], None]
