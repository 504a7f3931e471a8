"""The `ann` command line: parses, loads the recipe, calls one function per verb. No logic here.

Imports of torch and of the modules that use it stay inside the commands, so that `ann --help`
answers quickly.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Annotated, Optional

import typer

from anncli.cli import tools as cli_tools
from anncli.cli.common import fail as _fail
from anncli.cli.common import load as _load
from anncli.cli.common import run as _run
from anncli.cli.common import run_writing as _run_writing
from anncli.cli.data import data_app
from anncli.cli.options import PRED_FORMAT_HELP, App, RecipeArg, SetOpt, WorkDirOpt, launched, set_option
from anncli.cli.recipes import recipe_app, recipe_file, recipes_app
from anncli.cli.weights import weights_app
from anncli.paths import check_outputs, writable_dir

app = App(
    name="ann",
    help="Train and evaluate the Asymmetric Non-local Network (ANN, ICCV 2019) for semantic segmentation.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(recipe_app, name="recipe")  # anncli/cli/recipes.py: `ann recipe validate|show`
app.add_typer(data_app, name="data")  # anncli/cli/data.py: `ann data pack|synth|inspect`
app.add_typer(cli_tools.model_app, name="model")  # anncli/cli/tools.py: `ann model summary`, `ann bench attention`
app.add_typer(cli_tools.bench_app, name="bench")
app.add_typer(weights_app, name="weights")  # anncli/cli/weights.py: `ann weights import|inspect`
app.add_typer(recipes_app, name="recipes")  # anncli/cli/recipes.py: `ann recipes list|show|copy`


def _print_version(wanted: bool) -> None:
    if wanted:
        from anncli.cluster.env import version_line

        typer.echo(version_line())
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True, help=(
        "Print ann's version and the torch/CUDA it runs on, then exit."))] = False) -> None:
    pass



def _start(request, in_process, describe=None, preflight=None, run_dir=None, writes=None) -> None:
    """The launch tail of train and eval: plan where the verb runs, then print the plan (`describe`), start
    torchrun/srun (after `preflight(plan)`, which may refuse) and exit with its code, or run `in_process()`
    here (an int it returns is the exit code). `run_dir` (train's) is made and checked before the work and
    named after a Ctrl-C; a full or read-only disk under `writes` (or `run_dir`) during the work is one line."""
    from anncli.cluster import launch

    plan = _run(launch.plan_launch, request)
    if describe is not None:
        _run(describe, plan)
        return
    if plan.command is not None and preflight is not None:
        _run(preflight, plan)
    if run_dir is not None:
        run_dir = _run(writable_dir, run_dir, "--work-dir")
    from anncli.runs.checkpoint import interrupted_note

    note = None if run_dir is None else (lambda: interrupted_note(Path(run_dir)))
    if plan.command is not None:
        from anncli.cluster.supervisor import execute

        raise typer.Exit(execute(plan, checkpoint_note=note))
    try:
        code = _run_writing(writes or run_dir, in_process)
    except KeyboardInterrupt:  # a single process, Ctrl-C: the same line as a supervised run's
        from anncli.cluster.supervisor import interrupted

        raise typer.Exit(interrupted(note)) from None
    raise typer.Exit(code if isinstance(code, int) else 0)


@app.command()
@launched("train")
def train(
    recipe: RecipeArg,
    set_: SetOpt = None,
    work_dir: WorkDirOpt = None,
    resume: Annotated[str, typer.Option(metavar="auto|never|PATH", help="auto (newest complete checkpoint), never, or a checkpoint path.")] = "auto",
    init_from: Annotated[Optional[str], typer.Option(metavar="DIR|URL|NAME", help=(
        "Load model weights only from this checkpoint: a directory, or a peer checkpoint's URL or mmseg:// name "
        "(fetched and imported once into the weights cache)."))] = None,
    init_skip: Annotated[Optional[list[str]], typer.Option(help="With --init-from: leave these out (classifier: fine-tune to another class count).")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="Start over; move old checkpoints aside (superseded-<time>/).")] = False,
    allow_recipe_change: Annotated[bool, typer.Option("--allow-recipe-change",
                                                      help="Resume across recipe changes that break exactness.")] = False,
    compile_: Annotated[bool, typer.Option("--compile", help="torch.compile the network (recipe key "
                                                             "model.compile).")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved recipe and the launch plan (the exact "
                                                            "torchrun/srun command), then exit.")] = False,
    *,
    launch,
) -> None:
    """Train a recipe: in this process, under torchrun, or across SLURM nodes."""
    if init_skip and init_from is None:
        _fail(f"--init-skip {init_skip[0]} leaves tensors out of --init-from, which is not given; add --init-from DIR")
    from anncli.runs.rundir import check_start_flags

    _run(check_start_flags, resume, fresh, init_from is not None)  # before any launch, --dry-run included
    recipe = recipe_file(recipe)
    r = _load(recipe, [*(set_ or []), *(["model.compile=true"] if compile_ else [])])
    from anncli.train import local_weights
    from anncli.train.loop import TrainOptions
    from anncli.train.plan import describe_plan

    opts = TrainOptions(str(recipe), work_dir, resume, init_from, tuple(init_skip or ()), fresh=fresh,
                        allow_recipe_change=allow_recipe_change)
    describe = functools.partial(describe_plan, r, opts) if dry_run else None
    _start(launch, functools.partial(local_weights.train, r, opts), describe,
           functools.partial(local_weights.check_then_fetch, r, opts), run_dir=work_dir or Path("runs") / r.name)


@app.command("eval")
@launched("eval")
def eval_(
    recipe: Annotated[Optional[Path], typer.Argument(help=(
        "Recipe YAML or built-in name (default: the one saved with the checkpoint)."))] = None,
    checkpoint: Annotated[Optional[str], typer.Option(metavar="DIR|URL|NAME", help=(
        "Checkpoint directory (default: the newest complete one of the run directory; with no recipe either, the "
        "newest under runs/), or a peer checkpoint's URL or mmseg:// name, fetched and imported once."))] = None,
    set_: set_option("data.root=/scratch/cityscapes") = None,
    multiscale: Annotated[bool, typer.Option("--multiscale", help="Use the recipe's eval.scales (and eval.flip).")] = False,
    scales: Annotated[Optional[str], typer.Option(metavar="LIST", help=(
        "Comma-separated scales, e.g. 0.75,1,1.25 (default: 1, or the recipe's eval.scales with --multiscale)."))] = None,
    flip: Annotated[Optional[bool], typer.Option("--flip/--no-flip", help=(
        "Add horizontally flipped views (default: off, or the recipe's eval.flip with --multiscale)."))] = None,
    mode: Annotated[Optional[str], typer.Option(metavar="whole|slide", help=(
        "Whole-image or sliding-window inference (default: the recipe's eval.mode)."))] = None,
    crop: Annotated[Optional[str], typer.Option(metavar="HxW", help=(
        "Slide window, e.g. 864x864 (default: the recipe's eval.crop)."))] = None,
    stride: Annotated[Optional[str], typer.Option(metavar="HxW", help=(
        "Slide stride, e.g. 576x576 (default: the recipe's eval.stride)."))] = None,
    merge: Annotated[Optional[str], typer.Option(metavar="logits|softmax", help=(
        "Sum the logits (official) or average the softmax (mmseg) of the views (default: the recipe's "
        "eval.merge)."))] = None,
    split: Annotated[Optional[str], typer.Option(help=(
        "A split name (its manifest) or a shard pattern (default: the recipe's data.val)."))] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help=(
        "Write every number (fractions, not percent) and the protocol here; {checkpoint} in the path becomes the "
        "checkpoint's name, e.g. runs/x/eval-{checkpoint}.json."))] = None,
    save_pred: Annotated[Optional[Path], typer.Option(help=(
        "Write a PNG of every prediction here, in --pred-format (default: train ids, <key>.png)."))] = None,
    pred_format: Annotated[Optional[str], typer.Option(metavar="train-ids|cityscapes|ade20k", help=(
        "What --save-pred writes. " + PRED_FORMAT_HELP))] = None,
    work_dir: WorkDirOpt = None,
    *,
    launch,
) -> None:
    """Evaluate a checkpoint: mIoU per class, single- or multi-scale, with flip and sliding windows."""
    from anncli.eval.evaluate import EvalOptions, run_evaluation
    from anncli.interop.sources import resolve_checkpoint
    from anncli.runs.choose import choose_run

    recipe = None if recipe is None else recipe_file(recipe)
    local = _run(resolve_checkpoint, checkpoint, recipe, set_ or [])
    chosen = _run(choose_run, recipe, local, work_dir, set_ or [])
    opts = _run(EvalOptions.from_cli, recipe=chosen.recipe, recipe_path=str(chosen.recipe_path),
                checkpoint=chosen.checkpoint, multiscale=multiscale, scales=scales, flip=flip, mode=mode, crop=crop,
                stride=stride, merge=merge, split=split, json_out=json_out, save_pred=save_pred,
                pred_format_name=pred_format)
    _run(check_outputs, json_out=opts.json_out, save_pred=opts.save_pred)  # before the work, not after it
    if checkpoint is None:  # every rank evaluates the checkpoint chosen here, even if a newer one appears
        launch.argv += ["--checkpoint", str(chosen.checkpoint)]
    _start(launch, functools.partial(run_evaluation, chosen.recipe, opts), writes=opts.save_pred or opts.json_out)


@app.command()
def predict(
    images: Annotated[list[str], typer.Argument(help="Image files, directories (searched recursively) or globs.")],
    out: Annotated[Path, typer.Option(help="Output directory.")],
    checkpoint: Annotated[Optional[str], typer.Option(metavar="DIR|URL|NAME", help=(
        "Checkpoint directory (default: the newest complete one under runs/, or of the recipe's run "
        "directory), or a peer checkpoint's URL or mmseg:// name, fetched and imported once."))] = None,
    model: Annotated[Optional[Path], typer.Option(help="An ONNX file from `ann export`, run with onnxruntime on CPU (no torch needed).")] = None,
    recipe: Annotated[Optional[Path], typer.Option(help="Recipe (default: the one saved with the checkpoint).")] = None,
    set_: set_option("eval.merge=softmax") = None,
    multiscale: Annotated[bool, typer.Option("--multiscale", help="Use the recipe's eval.scales (and eval.flip).")] = False,
    flip: Annotated[Optional[bool], typer.Option("--flip/--no-flip", help=(
        "Add horizontally flipped views (default: off, or the recipe's eval.flip with --multiscale)."))] = None,
    fmt: Annotated[str, typer.Option("--format", metavar="train-ids|cityscapes|ade20k", help=(
        "The ids of the PNGs in --out. " + PRED_FORMAT_HELP + " A server format keeps --out to those files "
        "alone: pictures only with --colors/--overlay."))] = "train-ids",
    colors: Annotated[Optional[Path], typer.Option("--colors", help=(
        "Write the colour PNGs here (default: beside the ids with train-ids, none with a server format)."))] = None,
    overlay: Annotated[Optional[Path], typer.Option("--overlay", help=(
        "Write the overlays here (default: beside the ids with train-ids, none with a server format)."))] = None,
) -> None:
    """Segment images: an id PNG, a colour PNG and an overlay per image; exit 1 if an image could not be read."""
    from anncli.eval.formats import format_name

    _run(format_name, fmt)  # before any folder or model: a refused command leaves nothing behind
    if model is not None:
        if checkpoint is not None or recipe is not None or set_ or multiscale or flip:
            _fail("--model runs the exported file as it is: drop --checkpoint, --recipe, --set, --multiscale and --flip")
        from anncli.eval.onnx_predict import run_onnx_predict

        _run(check_outputs, out=out)
        _, failed = _run_writing(out, run_onnx_predict, images, model, out, fmt, colors, overlay)
        raise typer.Exit(1 if failed else 0)
    from anncli.eval.predict import run_predict
    from anncli.interop.sources import resolve_checkpoint
    from anncli.runs.choose import choose_run

    _run(check_outputs, out=out)
    local = _run(resolve_checkpoint, checkpoint, recipe, set_ or [])
    chosen = _run(choose_run, recipe, local, None, set_ or [])
    summary = _run_writing(out, run_predict, images=images, checkpoint=chosen.checkpoint, out=out,
                           recipe=chosen.recipe, multiscale=multiscale, flip=flip, fmt=fmt, colors=colors,
                           overlay=overlay)
    raise typer.Exit(1 if summary.failed else 0)


# plot, viz and export live in cli_tools.py (torch-free too); registered here, after predict.
app.command()(cli_tools.plot)
app.command()(cli_tools.export)
app.add_typer(cli_tools.viz_app, name="viz")


@app.command("env")
def env() -> None:
    """Versions, GPUs, SLURM and NCCL/GLOO settings: the block to paste into a bug report."""
    from anncli.cluster.env import print_env

    print_env()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
