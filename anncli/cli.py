"""The `ann` command line: parses, loads the recipe, calls one function per verb. No logic here.

Imports of torch and of the modules that use it stay inside the commands, so that `ann --help`
answers quickly.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from anncli.errors import EXIT_USAGE, UserError
from anncli.paths import check_outputs, fs_error_line, writable_dir

app = typer.Typer(
    name="ann",
    help="Train and evaluate the Asymmetric Non-local Network (ANN, ICCV 2019) for semantic segmentation.",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
recipe_app = typer.Typer(help="Check and print recipes.", no_args_is_help=True)
data_app = typer.Typer(help="Pack, generate and inspect WebDataset shards.", no_args_is_help=True)
model_app = typer.Typer(help="Model information.", no_args_is_help=True)
bench_app = typer.Typer(help="Benchmarks that measure and write JSON.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
app.add_typer(data_app, name="data")
app.add_typer(model_app, name="model")
app.add_typer(bench_app, name="bench")

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML, e.g. recipes/cityscapes.yaml.")]
SetOpt = Annotated[
    Optional[list[str]], typer.Option("--set", help="Override a recipe key: --set train.iters=100 (repeatable).")
]
NodesOpt = Annotated[Optional[int], typer.Option("--nodes", min=1, help="Number of nodes (default 1, or the SLURM allocation's).")]
NprocOpt = Annotated[
    Optional[int],
    typer.Option("--nproc-per-node", "--gpus-per-node", min=1, help="Processes per node (default: visible GPUs, or 1)."),
]
NodeRankOpt = Annotated[Optional[int], typer.Option("--node-rank", min=0, help="This node's rank (default: from rendezvous).")]
RdzvOpt = Annotated[Optional[str], typer.Option("--rdzv-endpoint", help="HOST:PORT of the c10d rendezvous (multi-node).")]
RestartsOpt = Annotated[int, typer.Option("--max-restarts", min=0, help="Worker-group restarts torchrun may do.")]


def _fail(message: str) -> None:
    typer.echo(f"ann: error: {message}", err=True)
    raise typer.Exit(EXIT_USAGE)


def _run(fn, *args, **kwargs):
    """Call into the library; a UserError becomes one line on stderr and exit code 2."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        _fail(str(e))


def _run_writing(where, fn, *args, **kwargs):  # `_run`; a full or read-only disk under `where`: one line
    try:
        return _run(fn, *args, **kwargs)
    except (OSError, RuntimeError) as e:
        if fs_error_line(e, where) is None:
            raise
        _fail(fs_error_line(e, where))


def _load(recipe: Path, overrides: Optional[list[str]]):
    from anncli.recipe import load_recipe

    return _run(load_recipe, recipe, overrides or [])


def _launch_request(verb, nodes, nproc, node_rank, rdzv, max_restarts):
    from anncli import launch

    return launch.LaunchRequest(
        argv=[verb, *sys.argv[sys.argv.index(verb) + 1 :]] if verb in sys.argv else [verb],
        nodes=nodes,
        nproc_per_node=nproc,
        node_rank=node_rank,
        rdzv_endpoint=rdzv,
        max_restarts=max_restarts,
    )


@app.command()
def train(
    recipe: RecipeArg,
    set_: SetOpt = None,
    work_dir: Annotated[Optional[Path], typer.Option(help="Run directory (default runs/<recipe name>).")] = None,
    resume: Annotated[str, typer.Option(help="auto (newest complete checkpoint), never, or a checkpoint path.")] = "auto",
    init_from: Annotated[Optional[Path], typer.Option(help="Load model weights only from this checkpoint.")] = None,
    nodes: NodesOpt = None,
    nproc_per_node: NprocOpt = None,
    node_rank: NodeRankOpt = None,
    rdzv_endpoint: RdzvOpt = None,
    max_restarts: RestartsOpt = 0,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the resolved recipe and the launch plan, then exit.")] = False,
) -> None:
    """Train a recipe: in this process, under torchrun, or across SLURM nodes."""
    r = _load(recipe, set_)
    from anncli import launch
    from anncli.plan import describe_plan
    from anncli.train import TrainOptions, run_training

    opts = TrainOptions(recipe_path=str(recipe), work_dir=work_dir, resume=resume, init_from=init_from)
    plan = _run(launch.plan_launch, _launch_request("train", nodes, nproc_per_node, node_rank, rdzv_endpoint, max_restarts))
    if dry_run:
        _run(describe_plan, r, opts, plan)
        return
    run_dir = _run(writable_dir, work_dir or Path("runs") / r.name, "--work-dir")  # checked before the work
    if plan.command is not None:
        raise typer.Exit(launch.execute(plan, run_dir=str(run_dir)))
    raise typer.Exit(_run_writing(run_dir, run_training, r, opts) or 0)


@app.command("eval")
def eval_(
    recipe: RecipeArg,
    checkpoint: Annotated[Optional[Path], typer.Option(help="Checkpoint directory (default: newest complete one of the run).")] = None,
    set_: SetOpt = None,
    multiscale: Annotated[bool, typer.Option("--multiscale", help="Use the recipe's eval.scales.")] = False,
    scales: Annotated[Optional[str], typer.Option(help="Comma-separated scales, e.g. 0.75,1,1.25.")] = None,
    flip: Annotated[Optional[bool], typer.Option("--flip/--no-flip", help="Add horizontally flipped views.")] = None,
    mode: Annotated[Optional[str], typer.Option(help="whole or slide.")] = None,
    crop: Annotated[Optional[str], typer.Option(help="Slide window HxW, e.g. 864x864.")] = None,
    stride: Annotated[Optional[str], typer.Option(help="Slide stride HxW, e.g. 576x576.")] = None,
    merge: Annotated[Optional[str], typer.Option(help="logits (sum, official) or softmax (mean, mmseg).")] = None,
    split: Annotated[str, typer.Option(help="Data split: val, train, or a shard pattern.")] = "val",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write every number and the protocol here.")] = None,
    save_pred: Annotated[Optional[Path], typer.Option(help="Write label-id PNGs of the predictions here.")] = None,
    work_dir: Annotated[Optional[Path], typer.Option(help="Run directory (default runs/<recipe name>).")] = None,
    nodes: NodesOpt = None,
    nproc_per_node: NprocOpt = None,
    node_rank: NodeRankOpt = None,
    rdzv_endpoint: RdzvOpt = None,
    max_restarts: RestartsOpt = 0,
) -> None:
    """Evaluate a checkpoint: mIoU per class, single- or multi-scale, with flip and sliding windows."""
    r = _load(recipe, set_)
    from anncli import launch
    from anncli.evaluate import EvalOptions, run_evaluation

    opts = _run(
        EvalOptions.from_cli,
        recipe=r,
        recipe_path=str(recipe),
        checkpoint=checkpoint,
        multiscale=multiscale,
        scales=scales,
        flip=flip,
        mode=mode,
        crop=crop,
        stride=stride,
        merge=merge,
        split=split,
        json_out=json_out,
        save_pred=save_pred,
        work_dir=work_dir,
    )
    _run(check_outputs, json_out=json_out, save_pred=save_pred)
    plan = _run(launch.plan_launch, _launch_request("eval", nodes, nproc_per_node, node_rank, rdzv_endpoint, max_restarts))
    if plan.command is not None:
        raise typer.Exit(launch.execute(plan))
    _run_writing(save_pred or json_out, run_evaluation, r, opts)


@app.command()
def predict(
    images: Annotated[list[str], typer.Argument(help="Image files, directories or globs.")],
    checkpoint: Annotated[Path, typer.Option(help="Checkpoint directory.")],
    out: Annotated[Path, typer.Option(help="Output directory.")],
    recipe: Annotated[Optional[Path], typer.Option(help="Recipe (default: the one saved with the checkpoint).")] = None,
    set_: SetOpt = None,
    multiscale: Annotated[bool, typer.Option("--multiscale", help="Use the recipe's eval.scales.")] = False,
    flip: Annotated[Optional[bool], typer.Option("--flip/--no-flip", help="Add horizontally flipped views.")] = None,
    fmt: Annotated[str, typer.Option("--format", help="trainid, or cityscapes (labelIds for the test server).")] = "trainid",
) -> None:
    """Segment images: label-id PNG, colour PNG and overlay per image."""
    from anncli.evaluate import run_predict

    _run(check_outputs, out=out)
    _run_writing(out, run_predict, images=images, checkpoint=checkpoint, out=out, recipe_path=recipe, overrides=set_ or [],
         multiscale=multiscale, flip=flip, fmt=fmt)


@recipe_app.command("validate")
def recipe_validate(recipes: Annotated[list[Path], typer.Argument(help="Recipe files.")], set_: SetOpt = None) -> None:
    """Check recipes against the schema; exit 2 on the first problem."""
    for path in recipes:
        r = _load(path, set_)
        typer.echo(f"{path}: ok ({r.name})")


@recipe_app.command("show")
def recipe_show(recipe: RecipeArg, set_: SetOpt = None) -> None:
    """Print the resolved recipe, overrides and defaults applied."""
    from anncli.recipe import recipe_to_yaml

    typer.echo(recipe_to_yaml(_load(recipe, set_)), nl=False)


@data_app.command("pack")
def data_pack(
    dataset: Annotated[str, typer.Argument(help="cityscapes, ade20k or pascal-context.")],
    root: Annotated[Path, typer.Argument(help="Dataset root in its official layout.")],
    out: Annotated[Path, typer.Argument(help="Output directory for shards and manifest.")],
    split: Annotated[str, typer.Option(help="Split to pack (cityscapes train|val|test, ade20k training|validation, pascal-context train|val).")],
    max_samples: Annotated[int, typer.Option(min=1, help="Samples per shard at most.")] = 100,
    max_size: Annotated[float, typer.Option(help="Bytes per shard at most.")] = 1e9,
    skip_missing: Annotated[bool, typer.Option("--skip-missing", help="Skip images without labels instead of failing.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the shuffled order of train shards.")] = 0,
) -> None:
    """Pack a dataset in its official layout into WebDataset shards with a manifest."""
    from anncli.data.datasets import pack_dataset

    _run(pack_dataset, dataset, root, out, split=split, max_samples=max_samples, max_size=int(max_size),
         skip_missing=skip_missing, seed=seed)


@data_app.command("synth")
def data_synth(
    out: Annotated[Path, typer.Argument(help="Output directory.")],
    train: Annotated[int, typer.Option(min=0, help="Training samples.")] = 2048,
    val: Annotated[int, typer.Option(min=0, help="Validation samples.")] = 256,
    size: Annotated[str, typer.Option(help="Image size HxW.")] = "64x128",
    seed: Annotated[int, typer.Option(help="Seed; the same seed gives identical bytes.")] = 0,
    max_samples: Annotated[int, typer.Option(min=1, help="Samples per shard at most.")] = 256,
) -> None:
    """Write the synthetic long-range dataset (a distant key decides the class of grey squares)."""
    from anncli.data.synth import write_synth

    _run(write_synth, out, train=train, val=val, size=size, seed=seed, max_samples=max_samples)


@data_app.command("inspect")
def data_inspect(
    shards: Annotated[str, typer.Argument(help="Shard path, brace pattern, or manifest JSON.")],
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
) -> None:
    """Counts, image sizes and per-class pixel histogram of shards; exit code 1 when it finds problems."""
    from anncli.data.shards import inspect_shards

    report = _run(inspect_shards, shards, as_json=json_out)
    if not report["ok"]:
        raise typer.Exit(1)


@model_app.command("summary")
def model_summary(
    model: Annotated[str, typer.Option(help="ann, fcn or nonlocal.")] = "ann",
    backbone: Annotated[str, typer.Option(help="resnet101, resnet50 or small.")] = "resnet101",
    classes: Annotated[int, typer.Option(min=1, help="Number of classes.")] = 19,
    input_size: Annotated[Optional[str], typer.Option("--input", help="Input HxW for FLOPs, e.g. 769x769.")] = None,
    aux: Annotated[bool, typer.Option("--aux/--no-aux", help="Include the auxiliary head.")] = True,
    json_out: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Parameters per module and FLOPs, the way mmseg's get_flops does."""
    from anncli.models.summary import print_summary

    _run(print_summary, model=model, backbone=backbone, classes=classes, input_size=input_size, aux=aux,
         as_json=json_out)


@bench_app.command("attention")
def bench_attention(
    sizes: Annotated[str, typer.Option(help="Feature maps HxW, comma-separated.")] = "96x96,128x128,128x256",
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16.")] = "float32",
    channels: Annotated[int, typer.Option(min=1, help="Input channels (paper: 2048).")] = 2048,
    repeats: Annotated[Optional[int], typer.Option(min=1, help="Timed forwards (default 10, or 3 for slow CPU sizes).")] = None,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="Write results JSON here.")] = None,
) -> None:
    """APNB vs plain non-local block: FLOPs, peak memory, time (the paper's efficiency table)."""
    _run(check_outputs, json_out=json_out)
    from anncli.bench import run_attention_bench

    _run(run_attention_bench, sizes=sizes, device=device, dtype=dtype, channels=channels, repeats=repeats,
         json_out=json_out)


@app.command("env")
def env() -> None:
    """Versions, GPUs, SLURM and NCCL/GLOO settings: the block to paste into a bug report."""
    from anncli.launch import print_env

    print_env()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
