"""Weights from other tools: official MendelXu/ANN and mmsegmentation ANN checkpoints into `ann`.

- `read_state_dict`: the tensors of a peer file, sized before loading;
- `import_checkpoint`: a normal checkpoint directory (model.pt, state.json, recipe.yaml, COMPLETE);
- `inspect`: format, network, classes and parameter count of a file;
- `init_from`: `ann train --init-from DIR [--init-skip classifier]`.
Files are read with `torch.load(weights_only=True)` only; the key names are peer_keys.py's.
"""

from __future__ import annotations

import os
import shutil
import zipfile
from pathlib import Path

import torch

from anncli.errors import UserError
from anncli.interop.peer_keys import (AUX, CLASSIFIER, FORMATS, IGNORED, depth_of, detect, peer_params,
                                      short_list, to_ann)
from anncli.recipe import AugmentConfig, LossConfig, ModelConfig, Recipe, load_recipe

SKIPPABLE = ("classifier",)


class ModelMismatch(UserError):
    """A peer checkpoint whose network is not the one of the recipe it is to be used with."""


MAX_CHECKPOINT_MB = 4096  # a peer file's size once loaded; ResNet-101 ANN with an optimizer state is ~1 GB
# Normalisation each variant's weights were trained with (official: BGR Caffe mean; mmseg: RGB ImageNet).
NORMALISATION = {"official": dict(bgr=True, mean=(102.9801, 115.9465, 122.7717), std=(1.0, 1.0, 1.0)),
                 "mmseg": dict(bgr=False, mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375))}


def loaded_mb(src: Path) -> float:
    """What a torch file holds once loaded, in MiB: its members' uncompressed sizes (a zip's deflated
    members inflate), or the file's size for the legacy format."""
    if zipfile.is_zipfile(src):
        with zipfile.ZipFile(src) as archive:
            return sum(member.file_size for member in archive.infolist()) / 2**20
    return src.stat().st_size / 2**20


def read_state_dict(src: str | Path, max_mb: int = MAX_CHECKPOINT_MB) -> dict[str, torch.Tensor]:
    """The tensors of a peer file, wrappers (`state_dict`, `model`) and the DataParallel prefix removed;
    a file that would load into more than `max_mb` MiB is refused before loading."""
    src = Path(src)
    if src.is_dir():
        what = "an ann checkpoint directory; its weights are ready to use" if (src / "model.pt").is_file() else "a directory"
        raise UserError(f"{src}: {what}; give the weights file a peer saved (a .pth or .pt file)")
    if not src.is_file():
        raise UserError(f"{src}: file not found")
    size = loaded_mb(src)
    if size > max_mb:
        raise UserError(f"{src}: loads into {size:.0f} MB, over --max-checkpoint-mb {max_mb} (raise it if the "
                        "file is trusted)")
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - an unreadable file is the user's input
        raise UserError(f"{src}: not a weights-only torch checkpoint ({type(e).__name__}); "
                        "files that need full unpickling are never loaded") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise UserError(f"{src}: holds no state dict of tensors (expected {{'state_dict': {{name: tensor}}}})")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return {k: v for k, v in obj.items() if not k.startswith(IGNORED)}


def model_config_of(state: dict[str, torch.Tensor], fmt: str, base: ModelConfig | None = None) -> ModelConfig:
    """The recipe's model section (or defaults) with variant, depth, classes and aux read from the tensors."""
    if CLASSIFIER[fmt] not in state:
        raise UserError(f"{fmt} checkpoint: missing keys: {CLASSIFIER[fmt]}")
    fields = dict(variant=fmt, backbone=depth_of(state), num_classes=int(state[CLASSIFIER[fmt]].shape[0]),
                  aux=any(k.startswith(AUX[fmt]) for k in state), pretrained=None, name="ann")
    if base is None:
        base = ModelConfig(dropout=0.1 if fmt == "mmseg" else 0.05)
    return base.model_copy(update=fields)


def check_keys(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor], what: str) -> None:
    """Missing, unexpected or mis-shaped keys against `own` become one UserError line."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [f"{k} {list(state[k].shape)} vs {list(v.shape)}" for k, v in own.items()
             if k in state and state[k].shape != v.shape]
    parts = [f"{label}: {short_list(names)}" for label, names in
             (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", wrong)) if names]
    if parts:
        raise UserError(f"{what}: " + "; ".join(parts))


def default_recipe(fmt: str, model: ModelConfig) -> Recipe:
    """A self-contained recipe for an import without --recipe: the variant's normalisation and loss."""
    loss = LossConfig() if fmt == "official" else LossConfig(ohem=False)
    name = f"imported-{fmt}-{model.backbone}-{model.num_classes}cls"
    return Recipe(name=name, model=model, augment=AugmentConfig(**NORMALISATION[fmt]), loss=loss)


def _with_model(base: Recipe, model: ModelConfig) -> Recipe:
    """`base` holding the file's model; class weights of another class count are dropped."""
    weights = base.loss.class_weights
    loss = base.loss
    if weights is not None and len(weights) != model.num_classes:
        loss = loss.model_copy(update={"class_weights": None})
    return base.model_copy(update={"model": model, "loss": loss})


def _write_dir(out: Path, state: dict[str, torch.Tensor], recipe: Recipe, source: dict) -> Path:
    from anncli.runs import checkpoint as ck
    from anncli.runs.integrity import write_marker
    from anncli.recipe import recipe_to_yaml

    if out.exists() and any(out.iterdir()):
        raise UserError(f"--out {out}: exists and is not empty")
    tmp = out.parent / f".tmp-{out.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ck.save_torch(state, tmp / "model.pt")
    ck.save_json({"step": 0, "recipe": recipe.name, "engine": recipe.engine, "world_size": 1,
                  "model": recipe.model.model_dump(mode="json"), "imported_from": source}, tmp / "state.json")
    (tmp / "recipe.yaml").write_text(recipe_to_yaml(recipe))
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    write_marker(out, step=0)  # checksums of model.pt, state.json and recipe.yaml, like any checkpoint
    return out


def import_checkpoint(fmt: str, src: Path, out: Path, recipe_path: Path | None = None,
                      classes: int | None = None, max_mb: int = MAX_CHECKPOINT_MB, source: str | None = None) -> Path:
    """`ann weights import`: a peer checkpoint -> an `ann` checkpoint directory; prints one summary line.
    `source`: the URL or name `src` was fetched from."""
    if fmt not in FORMATS:
        raise UserError(f"format {fmt!r}: expected one of {', '.join(FORMATS)}")
    state = read_state_dict(src, max_mb)
    found = detect(state)
    if found != fmt:
        raise UserError(f"{source or src}: looks like a {found} checkpoint, not {fmt}")
    base = load_recipe(recipe_path) if recipe_path is not None else None
    if base is not None and base.model.variant != fmt:
        raise UserError(f"--recipe {recipe_path}: model.variant is {base.model.variant}, the file is a {fmt} checkpoint")
    print(write_import(fmt, state, Path(out), base, classes, _origin(fmt, src, source)))
    return Path(out)


def import_fetched(src: Path, out: Path, base: Recipe | None, source: str) -> str:
    """A fetched peer checkpoint (its format detected) as the checkpoint directory `out`, the model section
    of `base` (the recipe it will be used with) filled from the tensors; returns the summary line."""
    state = read_state_dict(src)
    fmt = detect(state)
    if fmt not in FORMATS:
        raise UserError(f"{source}: an ImageNet backbone ({fmt}), not a segmentation checkpoint; give it as "
                        "model.pretrained")
    if base is not None and base.model.variant != fmt:
        raise ModelMismatch(f"{source}: a {fmt} checkpoint, and the recipe {base.name} has model.variant "
                            f"{base.model.variant}")
    return write_import(fmt, state, out, base, None, _origin(fmt, src, source))


def _origin(fmt: str, src: Path, source: str | None) -> dict:
    return {"format": fmt, "path": str(src), **({"source": source} if source else {})}


def write_import(fmt: str, state: dict[str, torch.Tensor], out: Path, base: Recipe | None, classes: int | None,
                 origin: dict) -> str:
    """Peer tensors of format `fmt` -> the checkpoint directory `out`; the summary line."""
    from anncli.models.ann import build_model

    model_cfg = model_config_of(state, fmt, None if base is None else base.model)
    if classes is not None and classes != model_cfg.num_classes:
        raise UserError(f"--classes {classes}: the checkpoint's classifier has {model_cfg.num_classes} classes")
    recipe = default_recipe(fmt, model_cfg) if base is None else _with_model(base, model_cfg)
    mapped = to_ann(state, fmt)
    with torch.device("meta"):
        net = build_model(recipe.model)
    for key in net.state_dict():  # files from before BN counted its batches
        if key.endswith("num_batches_tracked") and key not in mapped:
            mapped[key] = torch.tensor(0)
    check_keys(net.state_dict(), mapped, f"{fmt} checkpoint {origin.get('source', origin['path'])}")
    ordered = {k: mapped[k] for k in net.state_dict()}
    _write_dir(out, ordered, recipe, origin)
    params = sum(p.numel() for p in net.parameters())
    return (f"[ann] imported {fmt} {recipe.model.backbone}, {recipe.model.num_classes} classes, "
            f"{params:,} parameters -> {out} (recipe {recipe.name})")


def inspect(src: Path, max_mb: int = MAX_CHECKPOINT_MB) -> dict:
    """`ann weights inspect`: prints and returns format, network, classes, parameters."""
    state = read_state_dict(src, max_mb)
    fmt = detect(state)
    if fmt in FORMATS:
        cfg = model_config_of(state, fmt)
        net = f"ANN {cfg.backbone} ({'ResNetV1c-D8 + mmseg ANNHead' if fmt == 'mmseg' else 'deep-stem D8 + official head'})"
        info = {"format": fmt, "network": net, "classes": cfg.num_classes, "aux": cfg.aux,
                "variant": fmt, "params": peer_params(state, fmt)}
    else:
        prefix = "backbone." if any(k.startswith("backbone.") for k in state) else ""
        depth = depth_of(state, prefix)
        kind = "ResNetV1c (mmseg variant)" if fmt == "mmseg-backbone" else "deep-stem ResNet (official variant)"
        info = {"format": fmt, "network": f"ImageNet {depth} {kind}", "classes": None, "aux": False,
                "variant": fmt.split("-")[0], "params": peer_params(state, fmt)}
    for key in ("format", "network", "classes", "aux", "params"):
        value = info[key]
        print(f"{key + ':':10}{value:,}" if key == "params" else f"{key + ':':10}{'-' if value is None else value}")
    return info


def init_from(model: torch.nn.Module, path: Path, recipe: Recipe, skip: tuple[str, ...] | list[str] = ()) -> None:
    """`ann train --init-from DIR [--init-skip classifier]`: weights only, optionally without the classifiers."""
    from anncli.runs.retention import reading
    from anncli.runs.rundir import require_checkpoint

    bad = [s for s in skip if s not in SKIPPABLE]
    if bad:
        raise UserError(f"--init-skip {bad[0]}: expected one of {', '.join(SKIPPABLE)}")
    with reading(Path(path)):  # a running training's prune keeps it while it is read
        _init_from_checkpoint(model, require_checkpoint(Path(path)), recipe, skip)


def _init_from_checkpoint(model: torch.nn.Module, path: Path, recipe: Recipe, skip) -> None:
    from anncli.runs import checkpoint as ck
    from anncli.runs.integrity import load_torch

    if not skip:
        model.load_state_dict(ck.load_model_for_inference(path, recipe))
        return
    saved = ck.read_state(path).get("model", {}).get("num_classes", recipe.model.num_classes)
    ck.check_compatible(path, recipe.model_copy(update={"model": recipe.model.model_copy(update={"num_classes": saved})}))
    full = load_torch(path / "model.pt")
    heads = classifier_keys(model)
    dropped = [k for k in full if k in heads]
    state = {k: v for k, v in full.items() if k not in heads}
    own = {k: v for k, v in model.state_dict().items() if k not in heads}
    check_keys(own, state, f"--init-from {path}")
    model.load_state_dict(state, strict=False)
    shown = ", ".join(f"{k} {list(full[k].shape)}" for k in dropped)
    print(f"[ann] --init-from {path}: loaded {len(state)} tensors, skipped the classifiers ({shown}); "
          f"they start from fresh initialisation for {recipe.model.num_classes} classes", flush=True)


def classifier_keys(model: torch.nn.Module) -> set[str]:
    """State-dict names of the last 1x1 conv of the main classifier and of the aux head."""
    names = set()
    for attr in ("classifier", "aux_head"):
        head = getattr(model, attr, None)
        if head is None:
            continue
        last = head if isinstance(head, torch.nn.Conv2d) else list(head.children())[-1]
        prefix = next(n for n, m in model.named_modules() if m is last)
        names.update(f"{prefix}.{p}" for p, _ in last.named_parameters())
    return names
