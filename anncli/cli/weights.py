"""`ann weights import|inspect|fetch`: the Typer sub-app of anncli/cli/main.py, kept apart so cli.py stays short.

Parses only; the work is in anncli/interop/ (weights.py, sources.py; imported inside the commands, so `ann --help`
needs no torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from anncli.cli.common import fail as _fail
from anncli.cli.common import run as _run
from anncli.cli.common import run_writing as _run_writing
from anncli.paths import writable_dir
from anncli.cli.options import App, at_least

weights_app = App(help="Fetch weights by name or URL; import and inspect checkpoints of the official code and "
                       "mmsegmentation.", no_args_is_help=True)
SourceArg = Annotated[str, typer.Argument(metavar="SRC", help=(
    "The file: a path, an http(s):// URL, open-mmlab://NAME or mmseg://CONFIG (fetched into the weights cache)."))]


@weights_app.command("import")
def weights_import(
    fmt: Annotated[str, typer.Argument(metavar="{official|mmseg}", help="Who saved the file: official (MendelXu/ANN) or mmseg.")],
    src: SourceArg,
    out: Annotated[Path, typer.Option(help="Checkpoint directory to write.")],
    recipe: Annotated[Optional[Path], typer.Option(help="Recipe to save with it (default: the variant's settings).")] = None,
    classes: Annotated[Optional[int], typer.Option(callback=at_least(1), help="Expected class count, checked against the classifier.")] = None,
    max_checkpoint_mb: Annotated[int, typer.Option(callback=at_least(1), metavar="MB", help="Refuse a file that loads into more than this.")] = 4096,
) -> None:
    """Write an ann checkpoint directory from an official or mmseg ANN checkpoint."""
    from anncli.interop.sources import import_source

    if out.exists() and not out.is_dir():
        _fail(f"--out {out}: is a file; give the name of a new directory for the checkpoint")
    _run(writable_dir, out.parent, "--out")  # the directory itself is written whole, by a rename
    _run_writing(out, import_source, fmt, src, out, recipe_path=recipe, classes=classes, max_mb=max_checkpoint_mb)


@weights_app.command("inspect")
def weights_inspect(
    src: SourceArg,
    max_checkpoint_mb: Annotated[int, typer.Option(callback=at_least(1), metavar="MB", help="Refuse a file that loads into more than this.")] = 4096,
) -> None:
    """Print the detected format, network, classes and parameter count of a weights file (official, mmseg, or an
    ImageNet backbone)."""
    from anncli.interop.sources import weights_file
    from anncli.interop.weights import inspect

    _run(inspect, _run(weights_file, src), max_checkpoint_mb)


@weights_app.command("fetch")
def weights_fetch(
    src: Annotated[Optional[str], typer.Argument(metavar="NAME|URL", help=(
        "open-mmlab://NAME, mmseg://CONFIG or an http(s):// URL."))] = None,
    list_: Annotated[bool, typer.Option("--list", help="Show the named files, their published mIoU and which are "
                                                        "cached.")] = False,
) -> None:
    """Download a file into the weights cache (once, verified) and print its path: fill the cache on a login node
    before a job whose nodes have no internet."""
    from anncli.interop.sources import fetch_source, list_named

    if list_:
        typer.echo(_run(list_named))
    elif src is None:
        _fail("give NAME|URL to fetch, or --list")
    else:
        typer.echo(_run(fetch_source, src))
