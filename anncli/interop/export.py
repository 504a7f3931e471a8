"""`ann export`: a checkpoint as an ONNX or TorchScript file, checked against the eager model.

The exported graph includes the recipe's input normalisation: it takes float32 RGB pixels in 0..255,
[N, 3, H, W], and returns logits [N, K, H, W] at the input size. Class names, palette, dataset and recipe
name travel in the file (ONNX metadata_props, a TorchScript extra file `anncli.json`), so `ann predict
--model FILE.onnx` needs neither the recipe nor torch. Right after writing, the file is run
(onnxruntime on CPU, or torch.jit.load) on a random image and compared with the eager model; a
maximum absolute difference above 1e-3 fails the export.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from anncli.errors import UserError

FORMATS = ("onnx", "torchscript")
OPSET = 18
TOLERANCE = 1e-3
META_KEY = "anncli"  # ONNX metadata_props key / TorchScript extra file stem holding the JSON below


class Exported(nn.Module):
    """The network behind its input normalisation: RGB 0..255 [N, 3, H, W] -> logits [N, K, H, W]."""

    def __init__(self, model: nn.Module, mean, std, bgr: bool):
        super().__init__()
        self.model = model.eval()
        self.bgr = bool(bgr)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.bgr:
            image = image.flip(1)
        return self.model((image - self.mean) / self.std)


class ShapeFreeAdaptiveAvgPool(nn.Module):
    """adaptive_avg_pool2d as two matrix products whose bins are computed from the input's shape.

    torch's decomposition for ONNX fixes the largest bin length at the traced size, so a dynamic-size
    graph pools wrongly at other sizes; these bins (torch's rule: [floor(i*n/s), ceil((i+1)*n/s)))
    follow any height and width.
    """

    def __init__(self, size: int):
        super().__init__()
        self.size = int(size)

    def _matrix(self, n: int, like: torch.Tensor) -> torch.Tensor:
        i = torch.arange(self.size, device=like.device)
        j = torch.arange(n, device=like.device)
        start, end = (i * n) // self.size, ((i + 1) * n + self.size - 1) // self.size
        inside = ((j[None, :] >= start[:, None]) & (j[None, :] < end[:, None])).to(like.dtype)
        return inside / inside.sum(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows, cols = self._matrix(x.shape[-2], x), self._matrix(x.shape[-1], x)
        return torch.matmul(torch.matmul(rows, x), cols.transpose(0, 1))


def make_shape_free(model: nn.Module) -> None:
    """Swap every anchor sampler's average pools for ShapeFreeAdaptiveAvgPool (same numbers)."""
    from anncli.models.anchors import AnchorSampler

    for sampler in (m for m in model.modules() if isinstance(m, AnchorSampler)):
        sampler.separable = False  # the separable bin matrices are sized at trace time too
        for k, pool in enumerate(sampler.pools):
            if isinstance(pool, nn.AdaptiveAvgPool2d):
                sampler.pools[k] = ShapeFreeAdaptiveAvgPool(sampler.sizes[k])


def metadata(recipe, checkpoint: Path) -> dict:
    from anncli.eval.evaluate import _class_names
    from anncli.eval.predict import class_palette

    return {
        "recipe": recipe.name, "checkpoint": str(checkpoint), "dataset": recipe.data.dataset,
        "num_classes": recipe.model.num_classes,
        "classes": _class_names(recipe, recipe.data.val), "palette": class_palette(recipe).tolist(),
        "input": "float32 RGB pixels 0..255, [N, 3, H, W]", "output": "logits [N, K, H, W]",
    }


def _require(*modules: str) -> None:
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            raise UserError(f"ONNX export needs {name}: pip install 'anncli[export]'") from None


def export_onnx(module: Exported, example: torch.Tensor, out: Path, dynamic: bool, meta: dict) -> None:
    import onnx

    dims = None
    if dynamic:
        auto = torch.export.Dim.AUTO
        dims = ({0: auto, 2: auto, 3: auto},)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        torch.onnx.export(module, (example,), str(out), dynamo=True, opset_version=OPSET, input_names=["image"],
                          output_names=["logits"], dynamic_shapes=dims, verbose=False, external_data=False)
    proto = onnx.load(str(out))
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta)
    onnx.save(proto, str(out))


def export_torchscript(module: Exported, example: torch.Tensor, out: Path, meta: dict) -> None:
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, (example,), check_trace=False)
    # Saved in memory, written by Python: torch's file writer aborts the process (an exception in its
    # destructor) when a write fails, where Python raises an OSError that becomes one line.
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer, _extra_files={f"{META_KEY}.json": json.dumps(meta)})
    out.write_bytes(buffer.getbuffer())


def exported_runner(fmt: str, path: Path):
    """A function numpy [N,3,H,W] -> numpy logits that runs the written file, not the module in memory."""
    if fmt == "onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: session.run(None, {session.get_inputs()[0].name: x})[0]
    loaded = torch.jit.load(str(path), map_location="cpu")

    def run(x):
        with torch.no_grad():
            return loaded(torch.from_numpy(x)).numpy()

    return run


def check_parity(module: Exported, run, shapes: list[tuple[int, ...]], seed: int = 0) -> float:
    """Largest |exported - eager| over random images of the given shapes."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    for shape in shapes:
        x = rng.uniform(0, 255, size=shape).astype(np.float32)
        with torch.no_grad():
            eager = module(torch.from_numpy(x)).numpy()
        got = run(x)
        if got.shape != eager.shape:
            raise UserError(f"exported model returned {got.shape} for input {shape}, eager {eager.shape}")
        worst = max(worst, float(np.abs(got - eager).max()))
    return worst


_SUFFIXES = {"onnx": (".onnx",), "torchscript": (".pt", ".pth", ".ts", ".torchscript")}


def _check_suffix(out: Path, fmt: str) -> None:
    """A file named for the other format is refused (an ONNX file called model.pt would be loaded as TorchScript)."""
    other = next((f for f, suffixes in _SUFFIXES.items() if f != fmt and out.suffix.lower() in suffixes), None)
    if other:
        raise UserError(f"--out {out}: a {other} file name, but --format is {fmt}; name it *{_SUFFIXES[fmt][0]} "
                        f"or add --format {other}")


def _write(traced: Exported, example: torch.Tensor, out: Path, fmt: str, dynamic: bool, meta: dict) -> None:
    """The exported file, written whole (paths.replaced_whole): an existing `out` is replaced only by a
    complete file, and a failed export (a full disk, the file-size limit) leaves no file behind."""
    from anncli.paths import fs_error_line, replaced_whole

    try:
        with replaced_whole(out) as tmp:
            if fmt == "onnx":
                export_onnx(traced, example, tmp, dynamic, meta)
            else:
                export_torchscript(traced, example, tmp, meta)
    except UserError:
        raise
    except Exception as e:
        line = fs_error_line(e, out)
        raise UserError(line or f"export to {fmt} failed: {e.__class__.__name__}: "
                                f"{str(e).splitlines()[0][:300]}") from None


def run_export(checkpoint: Path, fmt: str, out: Path, size: Optional[str] = None, dynamic: bool = False,
               recipe_path: Optional[Path] = None, overrides=()) -> float:
    """Write `out` and return the parity error (max abs diff of logits against eager)."""
    from anncli.runs.checkpoint import checkpoint_recipe
    from anncli.eval.inference import load_model
    from anncli.eval.inference import parse_hw
    from anncli.recipe import load_recipe

    if fmt not in FORMATS:
        raise UserError(f"--format {fmt!r}: expected one of {', '.join(FORMATS)}")
    if dynamic and fmt != "onnx":
        raise UserError("--dynamic applies to --format onnx (a TorchScript trace keeps the traced sizes)")
    _check_suffix(Path(out), fmt)
    if fmt == "onnx":
        _require("onnx", "onnxscript", "onnxruntime")
    recipe = load_recipe(recipe_path or checkpoint_recipe(Path(checkpoint)), list(overrides))
    h, w = parse_hw(size, "--size") if size else tuple(recipe.augment.crop)
    aug = recipe.augment
    module = Exported(load_model(recipe, Path(checkpoint), torch.device("cpu")), aug.mean, aug.std, aug.bgr).eval()
    traced = module
    if dynamic:  # export a copy with shape-free pooling; parity is checked against the untouched model
        traced = copy.deepcopy(module)
        make_shape_free(traced.model)
    example = torch.zeros(2 if dynamic else 1, 3, h, w)
    out = Path(out)
    meta = metadata(recipe, Path(checkpoint))
    _write(traced, example, out, fmt, dynamic, meta)
    shapes = [(1, 3, h, w)]
    if dynamic:
        shapes.append((2, 3, h + 8 * max(1, h // 32), w + 8 * max(1, w // 32)))
    diff = check_parity(module, exported_runner(fmt, out), shapes)
    checked = ", ".join("x".join(map(str, s)) for s in shapes)
    runner = "onnxruntime (CPU)" if fmt == "onnx" else "torch.jit.load"
    print(f"wrote {out} ({fmt}{', opset %d' % OPSET if fmt == 'onnx' else ''}, input {'dynamic' if dynamic else f'1x3x{h}x{w}'})")
    print(f"parity: max |{runner} - eager| = {diff:.3g} on {checked} (tolerance {TOLERANCE:g})")
    if not diff <= TOLERANCE:
        raise UserError(f"exported model differs from eager by {diff:.3g} > {TOLERANCE:g}; {out} is left for inspection")
    return diff
