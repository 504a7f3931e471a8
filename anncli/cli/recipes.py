"""`ann recipes list|show|copy`: the built-in recipes and SLURM templates (anncli/catalog.py), `ann recipe validate|show`, and the
recipe argument of train/eval that takes a built-in name. Torch-free, like every command module.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from anncli.cli.common import load as _load
from anncli.cli.common import run as _run
from anncli.cli.common import run_writing as _run_writing
from anncli.cli.options import App, RecipeArg, SetOpt

recipe_app = App(help="Check and print recipes.", no_args_is_help=True)
recipes_app = App(help="The built-in recipes and SLURM templates: list, show, copy out to edit.",
                  no_args_is_help=True)

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="A built-in recipe, e.g. demo (`ann recipes list`).")]


def recipe_file(recipe: Path) -> Path:
    """The recipe file `ann train RECIPE` / `ann eval RECIPE` reads: the file of that name, else the built-in
    recipe; says which on stderr in the process the user started (not again in every rank or node)."""
    from anncli.catalog import resolve_recipe
    from anncli.cluster.launch import where_am_i

    path, note = _run(resolve_recipe, recipe)
    if note and where_am_i(os.environ) in ("shell", "slurm-allocation"):
        typer.echo(f"ann: {note}", err=True)
    return path


@recipes_app.command("list")
def recipes_list() -> None:
    """The built-in recipes: name, dataset, model, crop, iterations, GPUs x batch."""
    from anncli.catalog import recipe_table

    typer.echo(_run(recipe_table), nl=False)


@recipes_app.command("show")
def recipes_show(name: NameArg) -> None:
    """Print a built-in recipe as it is, comments included (`ann recipe show` prints one resolved)."""
    from anncli.catalog import builtin_recipe

    typer.echo(_run(builtin_recipe, name).read_text(), nl=False)


@recipes_app.command("copy")
def recipes_copy(
    name: Annotated[str, typer.Argument(metavar="NAME", help="A built-in recipe, or slurm for the sbatch templates.")],
    dest: Annotated[Optional[Path], typer.Argument(metavar="DEST", help=(
        "A file, or a directory to copy into (default: ./NAME.yaml; for slurm, the directory ./slurm)."))] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite files that exist.")] = False,
) -> None:
    """Copy a built-in recipe (or the SLURM templates) here to edit; `ann train FILE` then uses the copy."""
    from anncli.catalog import copy_recipe

    for path in _run_writing(dest or Path("."), copy_recipe, name, dest, force):
        typer.echo(f"wrote {path}")


@recipe_app.command("validate")
def recipe_validate(recipes: Annotated[list[Path], typer.Argument(help="Recipe files.")], set_: SetOpt = None) -> None:
    """Check recipes against the schema; exit 2 on the first problem."""
    for path in recipes:
        r = _load(recipe_file(path), set_)
        typer.echo(f"{path}: ok ({r.name})")


@recipe_app.command("show")
def recipe_show(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Print the resolved recipe, overrides and defaults applied."""
    from anncli.recipe import recipe_to_yaml

    typer.echo(recipe_to_yaml(_load(recipe_file(recipe), set_)), nl=False)
