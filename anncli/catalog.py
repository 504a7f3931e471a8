"""The recipes and SLURM templates that ship with the package: a built-in recipe by name, their table, copies.

The repo's recipes/ and slurm/ are the one source: anncli/recipes and anncli/slurm are links to them, which a
checkout and an editable install read through, and which the build resolves into copies inside the wheel
(pyproject.toml's package-data). Paths inside a recipe (data.root, model.pretrained) stay relative to the
current directory wherever the recipe file lives, so `ann train demo` writes data/synth and runs/demo here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from anncli.errors import UserError
from anncli.paths import replaced_whole, writable_dir, writable_file

PACKAGE = Path(__file__).parent
RECIPES = PACKAGE / "recipes"
TEMPLATES = PACKAGE / "slurm"
SUFFIXES = (".yaml", ".yml")
SLURM = "slurm"  # `ann recipes copy slurm DEST`: the templates, not a recipe


def builtin_names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def _known() -> str:
    return ", ".join(builtin_names()) or "none (the package was built without its recipes)"


def builtin_recipe(name: str) -> Path:
    """The file of the built-in recipe `name` (`demo` or `demo.yaml`); an unknown name lists the known ones."""
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix in SUFFIXES else name
    path = RECIPES / f"{stem}.yaml"
    if "/" in name or os.sep in name or not path.is_file():
        raise UserError(f"no built-in recipe {name!r}; built-in recipes: {_known()}")
    return path


def _is_bare_name(arg: str) -> bool:
    return bool(arg) and not os.path.isabs(arg) and len(Path(arg).parts) == 1 and not arg.startswith(".")


def resolve_recipe(arg: str | os.PathLike) -> tuple[Path, Optional[str]]:
    """The recipe file that `ann train ARG` / `ann eval ARG` means, and a line saying which one when a
    built-in recipe is involved. A file of that name wins; a bare name that is no file is a built-in recipe
    (a directory does not count: `ann train cityscapes` beside a cityscapes/ dataset folder); a path to
    nothing is left to load_recipe, which says "recipe file not found"."""
    text = os.fspath(arg)
    path = Path(text)
    bare = _is_bare_name(text)
    if path.is_file():
        if bare and (RECIPES / f"{path.stem}.yaml").is_file() and path.suffix in ("", *SUFFIXES):
            return path, f"recipe {text}: the file ./{text}, not the built-in recipe {path.stem}"
        return path, None
    if not bare:
        return path, None
    try:
        builtin = builtin_recipe(text)
    except UserError:
        what = "is a directory, not a recipe file," if path.is_dir() else "no such file"
        raise UserError(f"recipe {text}: {what} and no built-in recipe of that name; built-in recipes: "
                        f"{_known()}") from None
    note = f"recipe {text}: the built-in one, {builtin}"
    own = Path(f"{builtin.stem}.yaml")
    if own.is_file():
        note += f" (./{own} is not read: pass {own} to use it)"
    return builtin, note


def _model(r) -> str:
    m = r.model
    backbone = {"resnet50": "r50", "resnet101": "r101"}.get(m.backbone, m.backbone)
    if m.backbone != "small":
        backbone += f"-d{m.output_stride}"
    return f"{m.name} {backbone}" + (" (mmseg)" if m.variant == "mmseg" else "")


def recipe_rows() -> list[tuple[str, ...]]:
    """One row per built-in recipe: name, dataset, model, crop, iterations, GPUs x batch."""
    from anncli.recipe import load_recipe

    rows = []
    for name in builtin_names():
        r = load_recipe(RECIPES / f"{name}.yaml")
        t = r.train
        world = f"{t.world_size} x {t.batch_size}" + (f" x {t.accum_steps} accum" if t.accum_steps > 1 else "")
        rows.append((name, r.data.dataset, _model(r), f"{r.augment.crop[0]}x{r.augment.crop[1]}", str(t.iters),
                     world, r.name))
    return rows


def recipe_table() -> str:
    """`ann recipes list`: the built-in recipes as aligned columns, then which short names are aliases."""
    header = ("NAME", "DATASET", "MODEL", "CROP", "ITERATIONS", "GPUS x BATCH")
    rows = recipe_rows()
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
    aliases = [f"{row[0]} = {row[-1]}" for row in rows if row[0] != row[-1]]
    if aliases:
        lines += ["", "aliases (the same recipe, the run directory named after the long name): " + ", ".join(aliases)]
    return "\n".join(lines) + "\n"


def _write_copy(src: Path, dest: Path, force: bool, mode: Optional[int] = None) -> Path:
    if dest.exists() and not force:
        raise UserError(f"{dest}: exists; pass --force to overwrite it")
    with replaced_whole(dest) as tmp:
        tmp.write_bytes(src.read_bytes())
        if mode is not None:
            tmp.chmod(mode)
    return dest


def copy_recipe(name: str, dest: Optional[Path] = None, force: bool = False) -> list[Path]:
    """Copy a built-in recipe to DEST (a file, or a directory to put NAME.yaml in; default ./NAME.yaml), or
    with the name `slurm` the SLURM templates into the directory DEST (default ./slurm)."""
    if name == SLURM:
        folder = writable_dir(dest or Path(SLURM), "DEST")
        templates = sorted(TEMPLATES.glob("*.sh"))
        if not templates:
            raise UserError("the package was built without its SLURM templates")
        return [_write_copy(t, folder / t.name, force, 0o755) for t in templates]
    src = builtin_recipe(name)
    target = Path(dest) if dest is not None else Path(src.name)
    if target.is_dir():
        target = target / src.name
    return [_write_copy(src, writable_file(target, "DEST"), force)]
