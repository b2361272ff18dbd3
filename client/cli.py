"""Hospital-side ``medfed`` commands (registered through the ``medfed.commands`` group)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the hospital commands to the root ``medfed`` app."""
