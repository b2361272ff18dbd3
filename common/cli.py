"""The ``medfed`` command line: one typer app assembled from every package.

Each package contributes its commands through the ``medfed.commands`` entry-point group
(see ``pyproject.toml``): an entry point names a ``register(app)`` function that adds
commands or sub-apps to the root app. This keeps ``common`` free of imports of
``client``, ``server`` and ``simulation`` (DESIGN section 2) and lets a hospital's
minimal install expose only the commands whose packages import.
"""

from __future__ import annotations

import logging
import os
from importlib.metadata import entry_points

import typer
from rich.console import Console
from rich.logging import RichHandler

app = typer.Typer(
    name="medfed",
    help=(
        "medfed: federated learning for hospital imaging.\n\n"
        "Researchers: `medfed simulate` runs virtual hospitals on this machine.\n"
        "Hospitals: `medfed ingest` turns a DICOM export into a site dataset.\n"
        "Anyone: `medfed evaluate` checks a saved global model on held-out data."
    ),
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    rich_markup_mode="markdown",
)

console = Console(stderr=True)


@app.callback()
def _root(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at DEBUG level."),
) -> None:
    """Configure logging once for every command."""
    configure_logging(logging.DEBUG if verbose else logging.INFO)


def configure_logging(level: int = logging.INFO) -> None:
    """Send medfed's logs to stderr through rich; quiet noisy third-party loggers."""
    root = logging.getLogger()
    if not any(isinstance(h, RichHandler) for h in root.handlers):
        root.addHandler(RichHandler(console=console, show_path=False, rich_tracebacks=False))
    root.setLevel(level)
    for noisy in ("matplotlib", "PIL", "urllib3", "httpx", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _register_plugins() -> None:
    log = logging.getLogger(__name__)
    for ep in sorted(entry_points(group="medfed.commands"), key=lambda e: e.name):
        try:
            ep.load()(app)
        except ImportError as exc:  # e.g. torch absent on an ingestion-only install
            log.debug("medfed commands from %s unavailable: %s", ep.name, exc)


def main() -> None:
    """Entry point of the ``medfed`` console script."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # Before the plugins import their dependencies: Opacus calls logging.basicConfig at
    # import, which is a no-op only once the root logger has a handler.
    configure_logging()
    _register_plugins()
    app()
