"""`ann eval` and `ann predict`: checkpoint in, mIoU table and JSON (or label PNGs) out.

Distributed evaluation: each rank reads its own disjoint part of the split (every sample exactly once),
accumulates an int64 confusion matrix, and after the loop one all_reduce sums the matrices together
with the sample counts and an error flag, so a rank that fails never leaves the others waiting.
How the command-line options and the recipe combine into a protocol: `inference.resolve_protocol`.
"""

from __future__ import annotations

import glob
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch
from PIL import Image
from rich.console import Console

from anncli.errors import UserError
from anncli.inference import Protocol, predict_labels, resolve_protocol
from anncli.metrics import confusion_matrix, json_safe, metrics_from_confusion


@dataclass(frozen=True)
class EvalOptions:
    protocol: Protocol
    checkpoint: Optional[Path] = None  # None: the newest complete checkpoint of the run directory
    split: str = "val"
    json_out: Optional[Path] = None
    save_pred: Optional[Path] = None
    work_dir: Optional[Path] = None
    recipe_path: Optional[str] = None

    @classmethod
    def from_cli(cls, recipe, recipe_path, checkpoint, multiscale, scales, flip, mode, crop, stride, merge, split,
                 json_out, save_pred, work_dir) -> "EvalOptions":
        protocol = resolve_protocol(recipe, multiscale=multiscale, scales=scales, flip=flip, mode=mode, crop=crop,
                                    stride=stride, merge=merge)
        if not split or not split.strip():
            raise UserError("--split: empty")
        return cls(protocol=protocol, checkpoint=checkpoint, split=split, json_out=json_out, save_pred=save_pred,
                   work_dir=work_dir, recipe_path=recipe_path)


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
    from anncli.data.shards import read_manifest

    try:
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


def _reduce(cm: torch.Tensor, samples: int, failed: bool) -> tuple[torch.Tensor, int, int]:
    """One all_reduce for the matrix, the sample count and the number of failed ranks."""
    from anncli.distributed import all_reduce_sum_

    flat = torch.cat([cm.reshape(-1), torch.tensor([samples, int(failed)], dtype=torch.int64, device=cm.device)])
    all_reduce_sum_(flat)
    k = cm.shape[0]
    return flat[: k * k].reshape(k, k), int(flat[-2]), int(flat[-1])


def _evaluate_split(model, recipe, split: str, protocol: Protocol, info, save_pred: Optional[Path],
                    show_progress: bool) -> tuple[torch.Tensor, int]:
    """Confusion and sample count of the whole split, summed over ranks; every rank gets the result."""
    from anncli.data.shards import eval_samples, resolve_urls

    urls = resolve_urls(recipe.data.root, recipe.data.dataset, split)
    samples = eval_samples(urls, rank=info.rank, world_size=info.world_size, num_workers=recipe.data.num_workers)
    k = recipe.model.num_classes
    cm = torch.zeros(k, k, dtype=torch.int64, device=info.device)
    count, error = 0, None
    total = _rank_total(recipe, split, info) if show_progress else None
    with progress(f"eval {split}", total=total, enabled=show_progress) as advance:
        def seen(sample, pred):
            nonlocal count
            count += 1
            if save_pred is not None:
                write_label_png(save_pred / f"{sample['key']}.png", pred.to("cpu", torch.uint8).numpy())
            advance()

        try:
            cm = evaluate_model(model, samples, protocol, k, info.device, on_sample=seen)
        except Exception as e:  # still join the all_reduce so that no rank waits for this one
            error = e
    cm, total, failed = _reduce(cm, count, error is not None)
    if error is not None:
        raise error
    if failed:
        raise UserError(f"evaluation failed on {failed} other rank(s); see their messages")
    if total == 0:
        raise UserError(f"split {split!r}: no samples under {recipe.data.root}")
    return cm, total


def validate(model, recipe, info, split: Optional[str] = None) -> dict:
    """In-training validation: single-scale metrics of the recipe's protocol on every rank."""
    split = split or recipe.data.val
    cm, total = _evaluate_split(model, recipe, split, Protocol.from_recipe(recipe), info, None, False)
    return {**metrics_from_confusion(cm, _class_names(recipe, split)), "samples": total}


def _resolve_checkpoint(recipe, opts: EvalOptions) -> Path:
    from anncli.checkpoint import default_work_dir, latest_checkpoint

    if opts.checkpoint is not None:
        return Path(opts.checkpoint)
    run_dir = Path(opts.work_dir) if opts.work_dir else default_work_dir(recipe)
    found = latest_checkpoint(run_dir)
    if found is None:
        raise UserError(f"no complete checkpoint under {run_dir}/checkpoints; pass --checkpoint PATH")
    return found


def run_evaluation(recipe, opts: EvalOptions) -> dict:
    """Evaluate a checkpoint on a split; rank 0 prints the table and writes the JSON. Returns the report."""
    from anncli import distributed

    info = distributed.init_distributed()
    with distributed.rank_session(info):
        return _run(recipe, opts, info)


def _run(recipe, opts: EvalOptions, info) -> dict:
    from anncli.data.synth import prepare_synth

    start = time.perf_counter()
    checkpoint = _resolve_checkpoint(recipe, opts)
    prepare_synth(recipe.data, info.is_main)
    model = load_model(recipe, checkpoint, info.device)
    cm, total = _evaluate_split(model, recipe, opts.split, opts.protocol, info, opts.save_pred, info.is_main)
    metrics = metrics_from_confusion(cm, _class_names(recipe, opts.split))
    report = {
        "recipe": recipe.name, "recipe_path": opts.recipe_path, "checkpoint": str(checkpoint),
        "dataset": recipe.data.dataset, "split": opts.split, "samples": total, "world_size": info.world_size,
        "protocol": opts.protocol.describe(), **metrics, "seconds": round(time.perf_counter() - start, 3),
    }
    if info.is_main:
        _print_report(report)
        if opts.json_out is not None:
            Path(opts.json_out).write_text(json.dumps(json_safe(report), indent=2) + "\n")
    return report


def _print_report(report: dict) -> None:
    from anncli.report import metrics_table

    p = report["protocol"]
    window = f" crop {p['crop']} stride {p['stride']}" if p["mode"] == "slide" else ""
    title = (f"{report['recipe']} · {report['split']} · {report['samples']} images · scales {p['scales']}"
             f"{' + flip' if p['flip'] else ''} · {p['mode']}{window} · merge {p['merge']}")
    Console().print(metrics_table(report, title=title))


def load_model(recipe, checkpoint: Path, device: torch.device):
    """The recipe's network with the checkpoint's weights, in eval mode on the device."""
    from anncli.checkpoint import load_model_for_inference
    from anncli.models.ann import build_model

    model = build_model(recipe.model)
    model.load_state_dict(load_model_for_inference(Path(checkpoint), recipe))
    return model.to(device).eval()


@contextmanager
def progress(label: str, total: Optional[int] = None, enabled: bool = True):
    """A rich progress bar on a terminal (nothing in logs); yields a function that advances it by one."""
    console = Console(stderr=True)
    if not (enabled and console.is_terminal):
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn(f"[bold]{label}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task(label, total=total)
        yield lambda: bar.advance(task)


def write_label_png(path: Path, labels: np.ndarray) -> None:
    """uint8 ids as a single-channel ('L') PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(labels.astype(np.uint8), mode="L").save(path)


_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
FORMATS = ("trainid", "cityscapes")


def expand_images(items: Iterable[str]) -> list[Path]:
    """Files, directories (searched recursively) and globs, in order, without repeats."""
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.suffix.lower() in _IMAGE_SUFFIXES)
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        if not matches:
            raise UserError(f"{item}: no such image file, or no image matches")
        found.extend(m for m in matches if m not in found)
    return found


def class_palette(recipe) -> np.ndarray:
    """[K, 3] uint8 RGB colours: the dataset's palette, or fixed pseudo-random colours without one."""
    from anncli.data import datasets

    k = recipe.model.num_classes
    try:
        colours = np.asarray(datasets.palette(recipe.data.dataset), dtype=np.uint8).reshape(-1, 3)
    except Exception:  # no palette for this dataset: colours are cosmetic
        colours = np.zeros((0, 3), dtype=np.uint8)
    if len(colours) >= k:
        return colours[:k]
    extra = np.random.default_rng(0).integers(0, 256, size=(k - len(colours), 3), dtype=np.uint8)
    return np.concatenate([colours, extra])


def _label_lut(fmt: str, recipe) -> Optional[np.ndarray]:
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if fmt == "trainid":
        return None
    if recipe.data.dataset != "cityscapes" or recipe.model.num_classes != 19:
        raise UserError(f"--format cityscapes needs a 19-class Cityscapes recipe (this one: {recipe.data.dataset}, "
                        f"{recipe.model.num_classes} classes)")
    from anncli.data.datasets import CITYSCAPES_TRAINID_TO_LABELID

    lut = np.zeros(256, dtype=np.uint8)
    lut[:19] = CITYSCAPES_TRAINID_TO_LABELID
    return lut


def _read_rgb(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the image ({e.__class__.__name__})") from None


def write_prediction(out: Path, stem: str, image: np.ndarray, labels: np.ndarray, palette: np.ndarray,
                     lut: Optional[np.ndarray]) -> list[Path]:
    """<stem>_pred.png (ids; <stem>_labelIds.png with a lut), <stem>_color.png, <stem>_overlay.png."""
    ids = labels if lut is None else lut[labels]
    colour = palette[labels]
    blend = (0.5 * image.astype(np.float32) + 0.5 * colour.astype(np.float32)).round().astype(np.uint8)
    paths = [out / f"{stem}_{'pred' if lut is None else 'labelIds'}.png", out / f"{stem}_color.png",
             out / f"{stem}_overlay.png"]
    write_label_png(paths[0], ids)
    Image.fromarray(colour, mode="RGB").save(paths[1])
    Image.fromarray(blend, mode="RGB").save(paths[2])
    return paths


def run_predict(images, checkpoint, out, recipe_path=None, overrides=(), multiscale=False, flip=None,
                fmt="trainid") -> list[Path]:
    """Segment image files into `out`: label ids, colours and an overlay per image. Returns the paths."""
    from anncli.checkpoint import checkpoint_recipe
    from anncli.recipe import load_recipe

    recipe = load_recipe(recipe_path or checkpoint_recipe(Path(checkpoint)), list(overrides))
    lut = _label_lut(fmt, recipe)
    protocol = resolve_protocol(recipe, multiscale=multiscale, flip=flip)
    paths = expand_images(images)
    stems = [p.stem for p in paths]
    if len(set(stems)) != len(stems):
        raise UserError(f"two inputs share the name {next(s for s in stems if stems.count(s) > 1)!r}; "
                        "predict them into different --out directories")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(recipe, Path(checkpoint), device)
    palette, out = class_palette(recipe), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with progress("predict", total=len(paths)) as advance:
        for path in paths:
            image = _read_rgb(path)
            labels = predict_labels(model, image, protocol, device).to("cpu", torch.uint8).numpy()
            written += write_prediction(out, path.stem, image, labels, palette, lut)
            advance()
    return written
