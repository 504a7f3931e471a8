"""`ann eval` and in-training validation: checkpoint in, mIoU table and JSON out.

Distributed evaluation: each rank reads its own disjoint part of the split (every sample exactly once),
accumulates an int64 confusion matrix, and after the loop one all_reduce sums the matrices together
with the sample counts and an error flag, so a rank that fails never leaves the others waiting.
How the command-line options and the recipe combine into a protocol: `inference.resolve_protocol`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from rich.console import Console

from anncli.errors import UserError
from anncli.eval.formats import TRAIN_IDS, PredFormat, pred_format
from anncli.data.labels import IGNORE_INDEX
from anncli.paths import write_result
from anncli.eval.inference import Protocol, load_model, predict_labels, resolve_protocol
from anncli.eval.metrics import confusion_matrix, json_safe, metrics_from_confusion


@dataclass(frozen=True)
class EvalOptions:
    protocol: Protocol
    checkpoint: Path  # complete and verified: runs.choose_run picks it once, every rank evaluates it
    split: str = "val"
    json_out: Optional[Path] = None
    save_pred: Optional[Path] = None
    recipe_path: Optional[str] = None
    pred_format: PredFormat = TRAIN_IDS
    split_given: bool = False  # --split, not the recipe's data.val

    @classmethod
    def from_cli(cls, recipe, recipe_path, checkpoint, multiscale, scales, flip, mode, crop, stride, merge, split,
                 json_out, save_pred, pred_format_name: Optional[str] = None) -> "EvalOptions":
        """`split` None: the recipe's data.val (a split name or a shard pattern), as validation in training."""
        protocol = resolve_protocol(recipe, multiscale=multiscale, scales=scales, flip=flip, mode=mode, crop=crop,
                                    stride=stride, merge=merge)
        split_given, split = split is not None, recipe.data.val if split is None else split
        if not split or not split.strip():
            raise UserError("--split: empty")
        if pred_format_name is not None and save_pred is None:
            raise UserError(f"--pred-format {pred_format_name}: give --save-pred DIR too")
        fmt = pred_format(pred_format_name or "train-ids", recipe.data.dataset, recipe.model.num_classes,
                          "--pred-format")
        checkpoint = Path(checkpoint)
        if json_out is not None:
            json_out = Path(str(json_out).replace("{checkpoint}", checkpoint.name))
        return cls(protocol=protocol, checkpoint=checkpoint, split=split, json_out=json_out,
                   save_pred=save_pred, recipe_path=recipe_path, pred_format=fmt, split_given=split_given)


def evaluate_model(model, samples: Iterable[dict], protocol: Protocol, num_classes: int, device: torch.device,
                   on_sample: Optional[Callable[[dict, torch.Tensor], None]] = None) -> torch.Tensor:
    """This process's int64 confusion matrix [K, K] over `samples`; no collective is called.

    Pass the plain module, not a DDP wrapper (DDP's forward may broadcast buffers, a collective that
    would hang ranks holding different sample counts). `on_sample(sample, pred)` sees every prediction.
    """
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    was_training = model.training
    model.eval()
    try:
        for sample in samples:
            pred = predict_labels(model, sample["image"], protocol, device)
            label = torch.from_numpy(np.ascontiguousarray(sample["label"])).to(device)
            if label.shape != pred.shape:
                raise UserError(f"shard {sample.get('shard')}: sample {sample.get('key')}: label "
                                f"{tuple(label.shape)} does not match image {tuple(pred.shape)}")
            cm += confusion_matrix(pred, label, num_classes)
            if on_sample is not None:
                on_sample(sample, pred)
    finally:
        model.train(was_training)
    return cm


def _manifest(recipe, split: str) -> Optional[dict]:
    """The manifest of a split name or of a manifest path; None for other shard patterns."""
    from anncli.data.manifest import load_manifest, read_manifest

    try:
        if split.endswith(".json"):
            return load_manifest(Path(recipe.data.root, split))  # an absolute split stays absolute
        return read_manifest(recipe.data.root, recipe.data.dataset, split)
    except UserError:  # a shard pattern instead of a split name
        return None


def _class_names(recipe, split: str) -> list[str]:
    """The dataset's class names, else the manifest's, else the ids (names are cosmetic)."""
    k = recipe.model.num_classes
    try:
        from anncli.data.datasets import class_names

        names = list(class_names(recipe.data.dataset))
    except Exception:
        names = []
    if len(names) != k:
        names = list((_manifest(recipe, split) or {}).get("classes", []))
    return names if len(names) == k else [str(i) for i in range(k)]


def _rank_total(recipe, split: str, info) -> Optional[int]:
    """This rank's sample count from the manifest (shards are dealt out round-robin), for the progress bar."""
    manifest = _manifest(recipe, split)
    return sum(s["count"] for s in manifest["shards"][info.rank :: info.world_size]) if manifest else None


def _reduce(cm: torch.Tensor, samples: int, failed: bool, outside: int) -> tuple[torch.Tensor, int, int, int]:
    """One all_reduce for the matrix, the sample count, the number of failed ranks and the labelled pixels
    outside the class ids."""
    from anncli.cluster.distributed import all_reduce_sum_

    counts = torch.tensor([samples, int(failed), outside], dtype=torch.int64, device=cm.device)
    flat = torch.cat([cm.reshape(-1), counts])
    all_reduce_sum_(flat)
    k = cm.shape[0]
    return flat[: k * k].reshape(k, k), int(flat[-3]), int(flat[-2]), int(flat[-1])


def _evaluate_split(model, recipe, split: str, protocol: Protocol, info, save_pred: Optional[Path],
                    show_progress: bool, pred_fmt: PredFormat = TRAIN_IDS,
                    from_checkpoint: Optional[str] = None) -> tuple[torch.Tensor, int, int]:
    """Confusion, sample count and labelled pixels outside the class ids (not in the matrix) of the whole
    split, summed over ranks; every rank gets the result, rank 0 names the first such pixel it saw. With
    `save_pred`, every prediction is written there in `pred_fmt` (default: train ids). `from_checkpoint`:
    where the split comes from when a checkpoint's recipe names it (it may name local files only)."""
    from anncli.data.manifest import resolve_urls
    from anncli.data.shards import Limits, eval_samples
    from anncli.eval.formats import write_label_png
    from anncli.eval.report import progress

    urls = resolve_urls(recipe.data.root, recipe.data.dataset, split, from_checkpoint)
    samples = eval_samples(urls, rank=info.rank, world_size=info.world_size, num_workers=recipe.data.num_workers,
                           limits=Limits.of(recipe.data))
    k = recipe.model.num_classes
    cm = torch.zeros(k, k, dtype=torch.int64, device=info.device)
    count, error, outside, first = 0, None, 0, None
    total = _rank_total(recipe, split, info) if show_progress else None
    with progress(f"eval {split}", total=total, enabled=show_progress) as advance:
        def seen(sample, pred):
            nonlocal count, outside, first
            count += 1
            bad = sample["label"][(sample["label"] >= k) & (sample["label"] != IGNORE_INDEX)]
            outside += bad.size
            if bad.size and first is None:
                first = f"value {int(bad.max())} in shard {sample.get('shard')}, sample {sample.get('key')}"
            if save_pred is not None:
                name = _inside(save_pred, pred_fmt.filename(sample["key"]))
                write_label_png(name, pred_fmt.ids(pred.to("cpu", torch.uint8).numpy()))
            advance()

        try:
            cm = evaluate_model(model, samples, protocol, k, info.device, on_sample=seen)
        except Exception as e:  # still join the all_reduce so that no rank waits for this one
            error = e
    cm, total, failed, outside = _reduce(cm, count, error is not None, outside)
    if error is not None:
        raise error
    if failed:
        raise UserError(f"evaluation failed on {failed} other rank(s); see their messages")
    if total == 0:
        more = f" and {len(urls) - 1} more" if len(urls) > 1 else ""
        raise UserError(f"split {split!r}: no samples in {urls[0]}{more}")
    if outside and show_progress:
        example = f" (first: {first})" if first else ""
        print(f"[ann] warning: {outside:,} labelled pixels have values outside model.num_classes={k}{example}; "
              "they are not counted", file=sys.stderr, flush=True)
    return cm, total, outside


def _inside(folder: Path, name: str) -> Path:
    """`folder/name`, refused when it would resolve outside `folder` (a crafted key, a symlink out)."""
    base = Path(folder).resolve()
    path = (base / name).resolve()
    if not path.is_relative_to(base) or path == base:
        raise UserError(f"--save-pred: sample key {name!r} would write outside {folder}; refused")
    return path


def validate(model, recipe, info, split: Optional[str] = None) -> dict:
    """In-training validation: single-scale metrics of the recipe's protocol on every rank."""
    split = split or recipe.data.val
    cm, total, _ = _evaluate_split(model, recipe, split, Protocol.from_recipe(recipe), info, None, False)
    return {**metrics_from_confusion(cm, _class_names(recipe, split)), "samples": total}


def run_evaluation(recipe, opts: EvalOptions) -> dict:
    """Evaluate a checkpoint on a split; rank 0 prints the table and writes the JSON. Returns the report."""
    from anncli.cluster import distributed

    info = distributed.init_distributed()
    with distributed.rank_session(info):
        return _run(recipe, opts, info)


def _run(recipe, opts: EvalOptions, info) -> dict:
    from anncli.data.synth import prepare_synth
    from anncli.models.tuning import configure_algorithms, memory_format

    start = time.perf_counter()
    checkpoint = opts.checkpoint  # load_model verifies the files it reads
    # The checkpoint's own recipe (no recipe given) reads data but never creates it: a shared checkpoint
    # must not decide where this command writes.
    own = opts.recipe_path is not None and Path(opts.recipe_path).resolve() == (checkpoint / "recipe.yaml").resolve()
    if info.is_main:
        print(f"[ann] evaluating split {opts.split} of {recipe.data.dataset} under {recipe.data.root}"
              + (" (data.root of the checkpoint's recipe)" if own else ""), file=sys.stderr, flush=True)
    prepare_synth(recipe.data, info.is_main, create=not own)
    configure_algorithms(info.device, recipe.train.deterministic, shapes_repeat=opts.protocol.mode == "slide")
    model = load_model(recipe, checkpoint, info.device, memory_format(opts.protocol.channels_last, info.device))
    untrusted = f"data.val of {checkpoint / 'recipe.yaml'}" if own and not opts.split_given else None
    cm, total, outside = _evaluate_split(model, recipe, opts.split, opts.protocol, info, opts.save_pred,
                                         info.is_main, opts.pred_format, untrusted)
    metrics = metrics_from_confusion(cm, _class_names(recipe, opts.split))
    report = {
        "recipe": recipe.name, "recipe_path": opts.recipe_path, "checkpoint": str(checkpoint),
        "step": _step(checkpoint), "units": UNITS,
        "dataset": recipe.data.dataset, "split": opts.split, "samples": total, "world_size": info.world_size,
        "pixels_outside_classes": outside,
        "protocol": opts.protocol.describe(), **metrics, "seconds": round(time.perf_counter() - start, 3),
    }
    if info.is_main:
        _print_report(report)
        if opts.json_out is not None:
            write_result(opts.json_out, json.dumps(json_safe(report), indent=2) + "\n")
    return report


# What the JSON's numbers are: the table prints the fractions as percentages.
UNITS = {"aAcc": "fraction", "mIoU": "fraction", "mAcc": "fraction", "per_class.IoU": "fraction",
         "per_class.Acc": "fraction", "pixels": "count of labelled pixels", "seconds": "s"}


def _step(checkpoint: Path) -> Optional[int]:
    """The training step of a checkpoint: its state.json, else its step-NNNNNN name."""
    from anncli.runs.checkpoint import read_state
    from anncli.runs.rundir import STEP_PREFIX

    try:
        return int(read_state(checkpoint)["step"])
    except (OSError, KeyError, ValueError):
        name = Path(checkpoint).name
        return int(name[len(STEP_PREFIX):]) if name.startswith(STEP_PREFIX) and name[len(STEP_PREFIX):].isdigit() else None


def _print_report(report: dict) -> None:
    from anncli.eval.report import metrics_table

    p = report["protocol"]
    window = f" crop {p['crop']} stride {p['stride']}" if p["mode"] == "slide" else ""
    step = "" if report["step"] is None else f" (step {report['step']})"
    title = (f"{report['recipe']} · {report['split']} · {report['samples']} images · scales {p['scales']}"
             f"{' + flip' if p['flip'] else ''} · {p['mode']}{window} · merge {p['merge']}")
    console = Console()
    console.print(f"checkpoint {report['checkpoint']}{step} · {report['pixels']:,} labelled pixels", soft_wrap=True,
                  markup=False, highlight=False)
    console.print(metrics_table(report, title=title))
