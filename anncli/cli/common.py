"""What the command modules (cli.py, cli_tools.py, cli_weights.py) share: a library call whose UserError
becomes one line on stderr and exit code 2, and the same for a file-system failure under an output place
(a full or read-only disk). Torch-free, like every command module.
"""

from __future__ import annotations

import typer

from anncli.errors import EXIT_USAGE, UserError
from anncli.paths import fs_error_line


def fail(message: str) -> None:
    typer.echo(f"ann: error: {message}", err=True)
    raise typer.Exit(EXIT_USAGE)


def run(fn, *args, **kwargs):
    """Call into the library; a UserError becomes one line on stderr and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        fail(str(e))


def run_writing(where, fn, *args, **kwargs):
    """`run`, and a full or read-only disk under `where` (an output place) is one line too, not a traceback."""
    try:
        return run(fn, *args, **kwargs)
    except (OSError, RuntimeError) as e:
        line = fs_error_line(e, where)
        if line is None:
            raise
        fail(line)


def load(recipe, overrides):
    """The recipe file with its `--set` overrides, every problem one line."""
    from anncli.recipe import load_recipe

    return run(load_recipe, recipe, overrides or [])
