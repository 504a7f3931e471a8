"""The `ann plot`, `ann viz attention`, `ann export`, `ann model summary` and `ann bench attention` commands (registered by main.py): parse, call one function.

Like cli.py, nothing here imports torch at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from anncli.cli.common import run as _run
from anncli.cli.common import run_writing as _run_writing
from anncli.paths import check_outputs, check_picture
from anncli.cli.options import App, at_least

viz_app = App(help="Pictures of what the model does inside.", no_args_is_help=True)
model_app = App(help="Model information.", no_args_is_help=True)
bench_app = App(help="Benchmarks that measure and write JSON.", no_args_is_help=True)
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", help="Override a recipe key, e.g. --set model.num_classes=5 (repeatable).")
]


def plot(
    inputs: Annotated[list[Path], typer.Argument(help="Run directories (curves) or `ann eval --json` files (per-class IoU bars).")],
    out: Annotated[Path, typer.Option(help="Picture to write (.png, .pdf, .svg).")],
) -> None:
    """Training curves of runs overlaid (loss, aux loss, LR, img/s, val mIoU), or per-class IoU bars."""
    from anncli.interop.plot import run_plot

    _run(check_picture, out)
    _run(check_outputs, out_file=out)
    _run_writing(out, run_plot, inputs, out)


@viz_app.command("attention")
def viz_attention(
    image: Annotated[Path, typer.Argument(help="An image file.")],
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint directory.")],
    pixel: Annotated[str, typer.Option(help="The query pixel Y,X, e.g. 32,100.")],
    out: Annotated[Path, typer.Option(help="Picture to write.")] = Path("attn.png"),
    recipe: Annotated[Optional[Path], typer.Option(help="Recipe (default: the one saved with the checkpoint).")] = None,
    set_: SetOpt = None,
) -> None:
    """Where one pixel looks: APNB and AFNB anchor weights (scales 1, 3, 6, 8) mapped onto the image."""
    from anncli.interop.viz import run_viz_attention

    _run(check_picture, out)
    _run(check_outputs, out_file=out)
    _run_writing(out, run_viz_attention, checkpoint, image, pixel, out, recipe_path=recipe, overrides=set_ or [])


def export(
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint directory.")],
    out: Annotated[Path, typer.Option(help="File to write, e.g. model.onnx or model.pt.")],
    fmt: Annotated[str, typer.Option("--format", help="onnx or torchscript.")] = "onnx",
    size: Annotated[Optional[str], typer.Option(help="Input HxW (default: the recipe's training crop).")] = None,
    dynamic: Annotated[bool, typer.Option("--dynamic", help="ONNX: batch, height and width left free.")] = False,
    recipe: Annotated[Optional[Path], typer.Option(help="Recipe (default: the one saved with the checkpoint).")] = None,
    set_: SetOpt = None,
) -> None:
    """Export a checkpoint to ONNX or TorchScript, checked against the eager model (max abs diff <= 1e-3)."""
    from anncli.interop.export import run_export

    _run(check_outputs, out_file=out)
    _run_writing(out, run_export, checkpoint, fmt, out, size=size, dynamic=dynamic, recipe_path=recipe, overrides=set_ or [])


@model_app.command("summary")
def model_summary(
    model: Annotated[str, typer.Option(help="ann, fcn or nonlocal.")] = "ann",
    variant: Annotated[str, typer.Option(help=(
        "official (the paper's code) or mmseg (mmsegmentation's ANN: ResNetV1c, its heads)."))] = "official",
    backbone: Annotated[str, typer.Option(help="resnet101, resnet50 or small.")] = "resnet101",
    classes: Annotated[int, typer.Option(callback=at_least(1), help="Number of classes.")] = 19,
    input_size: Annotated[Optional[str], typer.Option("--input", metavar="HxW", help=(
        "Input size for FLOPs, e.g. 769x769 (default: none, parameters only)."))] = None,
    aux: Annotated[bool, typer.Option("--aux/--no-aux", help="Include the auxiliary head.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Parameters per module and FLOPs, the way mmseg's get_flops does."""
    from anncli.interop.summary import print_summary

    _run(print_summary, model=model, backbone=backbone, classes=classes, input_size=input_size, aux=aux,
         as_json=json_out, variant=variant)


@bench_app.command("attention")
def bench_attention(
    sizes: Annotated[str, typer.Option(metavar="HxW,…", help="Feature maps, comma-separated.")] = "96x96,128x128,128x256",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    channels: Annotated[int, typer.Option(callback=at_least(1), help="Input channels (paper: 2048).")] = 2048,
    repeats: Annotated[Optional[int], typer.Option(callback=at_least(1), help="Timed forwards (default 10, or 3 for slow CPU sizes).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write results JSON here.")] = None,
) -> None:
    """APNB vs plain non-local block: FLOPs, peak memory, time (the paper's efficiency table)."""
    _run(check_outputs, json_out=json_out)
    from anncli.interop.bench import run_attention_bench

    _run(run_attention_bench, sizes=sizes, device=device, dtype=dtype, channels=channels, repeats=repeats,
         json_out=json_out)
