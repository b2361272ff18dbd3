#!/usr/bin/env python3
"""Fail when a function in production code is longer than 100 lines (issue 15).

Walks the AST of every module under common/, client/, server/ and simulation/ and counts
each function's lines from its ``def`` (decorators excluded) to its last line, docstring
and comments included. Nested functions are measured on their own and also count toward
their enclosing function. Run by ``make lint``; McCabe complexity is ruff's C901.

Usage: ``python .ci/function_length.py [--max N] [ROOT]``.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

PACKAGES = ("common", "client", "server", "simulation")
MAX_LINES = 100


def long_functions(root: Path, max_lines: int) -> list[tuple[str, str, int]]:
    """Return (path, qualified name, lines) for every function longer than ``max_lines``."""
    found: list[tuple[str, str, int]] = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            _visit(tree, "", path.relative_to(root).as_posix(), max_lines, found)
    return found


def _visit(
    node: ast.AST, prefix: str, path: str, max_lines: int, found: list[tuple[str, str, int]]
) -> None:
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            name = f"{prefix}{child.name}"
            if not isinstance(child, ast.ClassDef):
                lines = (child.end_lineno or child.lineno) - child.lineno + 1
                if lines > max_lines:
                    found.append((path, name, lines))
            _visit(child, f"{name}.", path, max_lines, found)
        else:
            _visit(child, prefix, path, max_lines, found)


def main(argv: list[str] | None = None) -> int:
    """Print each over-long function as ``path:name: N lines``; exit 1 if there is one."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", type=Path, default=Path(__file__).parent.parent)
    parser.add_argument("--max", type=int, default=MAX_LINES, help="most lines a function may have")
    args = parser.parse_args(argv)
    found = long_functions(args.root, args.max)
    for path, name, lines in found:
        print(f"{path}:{name}: {lines} lines (at most {args.max})")  # noqa: T201
    if found:
        print(f"{len(found)} function(s) over {args.max} lines", file=sys.stderr)  # noqa: T201
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
