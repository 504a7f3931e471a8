"""`ann weights import|inspect`: the Typer sub-app of anncli/cli.py, kept apart so cli.py stays short.

Parses only; the work is in anncli/weights.py (imported inside the commands, so `ann --help` needs no torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from anncli.cli_options import App
from anncli.errors import EXIT_USAGE, UserError

weights_app = App(help="Import and inspect checkpoints of the official code and mmsegmentation.",
                          no_args_is_help=True)


def _run(fn, *args, **kwargs):
    """As in cli.py: a UserError becomes one line on stderr and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        typer.echo(f"ann: error: {e}", err=True)
        raise typer.Exit(EXIT_USAGE) from None


@weights_app.command("import")
def weights_import(
    fmt: Annotated[str, typer.Argument(metavar="{official|mmseg}", help="Who saved the file: official (MendelXu/ANN) or mmseg.")],
    src: Annotated[Path, typer.Argument(help="The checkpoint file as the peer saved it.")],
    out: Annotated[Path, typer.Option(help="Checkpoint directory to write.")],
    recipe: Annotated[Optional[Path], typer.Option(help="Recipe to save with it (default: the variant's settings).")] = None,
    classes: Annotated[Optional[int], typer.Option(min=1, help="Expected class count, checked against the classifier.")] = None,
) -> None:
    """Write an ann checkpoint directory from an official or mmseg ANN checkpoint."""
    from anncli.weights import import_checkpoint

    _run(import_checkpoint, fmt, src, out, recipe_path=recipe, classes=classes)


@weights_app.command("inspect")
def weights_inspect(src: Annotated[Path, typer.Argument(help="Weights file: official, mmseg, or an ImageNet backbone.")]) -> None:
    """Print the detected format, network, classes and parameter count of a weights file."""
    from anncli.weights import inspect

    _run(inspect, src)
