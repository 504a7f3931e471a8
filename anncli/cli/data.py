"""`ann data pack|synth|inspect`: the Typer sub-app of anncli/cli/main.py, kept apart so cli.py stays short.

Parses only; the work is in anncli/data/ (imported inside the commands, so `ann --help` needs no torch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from anncli.cli.common import run as _run
from anncli.cli.options import App, at_least
from anncli.recipe import DataConfig

_DATA = DataConfig.model_fields  # the recipe's defaults of the caps `data inspect` takes as flags

data_app = App(help="Pack, generate and inspect WebDataset shards.", no_args_is_help=True)


@data_app.command("pack")
def data_pack(
    dataset: Annotated[str, typer.Argument(help="cityscapes, ade20k, pascal-context or voc12aug.")],
    root: Annotated[Path, typer.Argument(help="Dataset root in its official layout.")],
    out: Annotated[Path, typer.Argument(help="Output directory for shards and manifest.")],
    split: Annotated[str, typer.Option(help="Split to pack (cityscapes train|val|test, ade20k training|validation, pascal-context train|val, voc12aug train|val).")],
    max_samples: Annotated[int, typer.Option(callback=at_least(1), help="Samples per shard at most.")] = 100,
    max_size: Annotated[int, typer.Option(callback=at_least(1), metavar="BYTES", help="Bytes per shard at most.")] = 1_000_000_000,
    skip_missing: Annotated[bool, typer.Option("--skip-missing", help="Skip images without labels instead of failing.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the shuffled order of train shards.")] = 0,
) -> None:
    """Pack a dataset in its official layout into WebDataset shards with a manifest."""
    from anncli.data.datasets import pack_dataset

    _run(pack_dataset, dataset, root, out, split=split, max_samples=max_samples, max_size=max_size,
         skip_missing=skip_missing, seed=seed)


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Argument(help="Output directory.")],
    train: Annotated[int, typer.Option(callback=at_least(0), help="Training samples (the demo recipe's count).")] = 4096,
    val: Annotated[int, typer.Option(callback=at_least(0), help="Validation samples.")] = 256,
    size: Annotated[str, typer.Option(metavar="HxW", help="Image size.")] = "64x128",
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives identical bytes.")] = 0,
    max_samples: Annotated[int, typer.Option(callback=at_least(1), help="Samples per shard at most.")] = 256,
    force: Annotated[bool, typer.Option("--force", help="Replace a synthetic set that OUT holds already.")] = False,
) -> None:
    """Write the synthetic long-range dataset (a distant key decides the class of grey squares)."""
    from anncli.data.synth import write_synth

    _run(write_synth, out, train=train, val=val, size=size, seed=seed, max_samples=max_samples, force=force)


@data_app.command("inspect")
def data_inspect(
    shards: Annotated[str, typer.Argument(help="Shard path, brace pattern, or manifest JSON.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    max_member_mb: Annotated[int, typer.Option(callback=at_least(1), metavar="MB", help="Largest tar member read (a recipe's data.max_member_mb).")] = _DATA["max_member_mb"].default,
    max_pixels: Annotated[int, typer.Option(callback=at_least(1), metavar="N", help="Largest image or label decoded, in pixels (data.max_pixels).")] = _DATA["max_pixels"].default,
) -> None:
    """Counts, image sizes and per-class pixel histogram of shards; exit code 1 when it finds problems."""
    from anncli.data.inspect import inspect_shards
    from anncli.data.guards import Limits

    report = _run(inspect_shards, shards, as_json=json_out, limits=Limits(max_member_mb, max_pixels))
    if not report["ok"]:
        raise typer.Exit(1)
