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
import sys
from importlib.metadata import entry_points
from typing import NoReturn

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.text import Text

from common.errors import ExitCode, exit_code

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


#: Top-level modules of the ``fl`` extra (pyproject.toml). The base install (DICOM ingestion
#: and the PHI check) has none of them; a command that needs one says which extra to install.
FL_EXTRA_MODULES = frozenset(
    {"flwr", "torch", "opacus", "monai", "ray", "sklearn", "matplotlib", "yaml", "Crypto"}
)
FL_EXTRA_HINT = "pip install 'medfed[fl]'"

#: Entry points whose commands could not load for want of the ``fl`` extra: name -> module.
_unavailable: dict[str, str] = {}


def missing_fl_module(exc: BaseException) -> str | None:
    """Name the ``fl``-extra module whose absence raised ``exc``, or None if it is another error."""
    if not isinstance(exc, ImportError):
        return None
    root = (exc.name or "").split(".")[0]
    return root if root in FL_EXTRA_MODULES else None


def _register_plugins() -> None:
    log = logging.getLogger(__name__)
    for ep in sorted(entry_points(group="medfed.commands"), key=lambda e: e.name):
        try:
            ep.load()(app)
        except ImportError as exc:  # e.g. torch absent on an ingestion-only install
            log.debug("medfed commands from %s unavailable: %s", ep.name, exc)
            missing = missing_fl_module(exc)
            if missing is not None:
                _unavailable[ep.name] = missing
    if _unavailable:
        app.info.epilog = (
            f"Some commands need the `fl` extra (torch, Flower, Opacus), not installed here: "
            f"`{FL_EXTRA_HINT}`."
        )


def _command_of(argv: list[str]) -> str:
    """Return the first argument that is not an option (the command), or ``""``."""
    return next((a for a in argv if not a.startswith("-")), "")


def print_error(message: object, *, heading: str = "error") -> None:
    """Print ``heading: message`` to stderr; the message is plain text, never markup."""
    console.print(Text.assemble((f"{heading}:", "bold red"), " ", str(message)))


def fail(
    error: BaseException | str, *, code: int | None = None, heading: str = "error"
) -> typer.Exit:
    """Print a clear error to stderr and return the ``typer.Exit`` that ends the command.

    Every ``medfed`` command ends on an error this way: ``raise fail(exc) from None``.

    Parameters
    ----------
    error : BaseException or str
        What went wrong (an exception's text is printed as is).
    code : int, optional
        The exit status; default :func:`common.errors.exit_code` of an exception (the
        one table, :data:`common.errors.CODES`), :attr:`ExitCode.USAGE` for a message.
    heading : str
        The red word(s) before the message.

    Returns
    -------
    typer.Exit
        Raise it.

    """
    print_error(error, heading=heading)
    if code is None:
        code = exit_code(error) if isinstance(error, BaseException) else ExitCode.USAGE
    return typer.Exit(code=int(code))


def _needs_fl_extra(what: str, module: str) -> NoReturn:
    print_error(
        f"{what} needs {module!r} from the `fl` extra (torch, Flower, Opacus, ...), which "
        "this install lacks; an ingestion-only install has `medfed ingest` and `medfed "
        f"deid-check`. Install the extra with: {FL_EXTRA_HINT}"
    )
    sys.exit(ExitCode.USAGE)


def main() -> None:
    """Entry point of the ``medfed`` console script."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    # Before the plugins import their dependencies: Opacus calls logging.basicConfig at
    # import, which is a no-op only once the root logger has a handler.
    configure_logging()
    _register_plugins()
    command = _command_of(sys.argv[1:])
    if _unavailable and command:
        known = getattr(typer.main.get_command(app), "commands", {})
        if command not in known:
            _needs_fl_extra(
                f"`medfed {command}` is not a command of this install: it may be one that",
                next(iter(_unavailable.values())),
            )
    try:
        app()
    except ImportError as exc:
        missing = missing_fl_module(exc)
        if missing is None:
            raise
        _needs_fl_extra(f"`medfed {command}`", missing)
