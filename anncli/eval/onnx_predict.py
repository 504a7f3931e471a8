"""`ann predict --model FILE.onnx`: segment images with an exported model on onnxruntime (CPU), no torch.

The file is one written by `ann export --format onnx`: its input is RGB 0..255 and its metadata holds
the class names and palette. A model with a fixed input size gets each image resized to that size
(bilinear) and its logits resized back; a dynamic one runs each image at its own size. The outputs
match `ann predict --checkpoint`: ids in the chosen format (eval/formats.py), <stem>_color.png,
<stem>_overlay.png.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from anncli.data.images import expand_images, read_rgb
from anncli.errors import UserError

class OnnxSegmenter:
    """An exported model in an onnxruntime CPU session, with its class names and palette."""

    def __init__(self, path: Path, threads: int = 0):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("--model needs onnxruntime: pip install 'anncli[export]'") from None
        if not Path(path).is_file():
            raise UserError(f"--model {path}: no such file")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise UserError(f"--model {path}: onnxruntime cannot load it ({e.__class__.__name__})") from None
        meta = self.session.get_modelmeta().custom_metadata_map.get("anncli")
        if meta is None:
            raise UserError(f"--model {path}: no anncli metadata; export it with `ann export --format onnx`")
        self.meta, self.palette = _read_meta(path, meta)
        spec = self.session.get_inputs()[0]
        if len(spec.shape) != 4:
            raise UserError(f"--model {path}: input {spec.name} has shape {spec.shape}, expected N x 3 x H x W")
        self.input_name = spec.name
        h, w = spec.shape[2], spec.shape[3]
        self.fixed = (h, w) if isinstance(h, int) and isinstance(w, int) else None

    def logits(self, image: np.ndarray) -> np.ndarray:
        """uint8 HxWx3 RGB -> float32 logits [K, H, W] at the image's size."""
        import cv2

        height, width = image.shape[:2]
        x = image if self.fixed is None else cv2.resize(image, self.fixed[::-1], interpolation=cv2.INTER_LINEAR)
        batch = np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)
        out = self.session.run(None, {self.input_name: batch})[0][0]
        if out.shape[1:] != (height, width):
            hwk = cv2.resize(np.ascontiguousarray(out.transpose(1, 2, 0)), (width, height),
                             interpolation=cv2.INTER_LINEAR)
            out = hwk.reshape(height, width, -1).transpose(2, 0, 1)
        return out

    def labels(self, image: np.ndarray) -> np.ndarray:
        return self.logits(image).argmax(axis=0).astype(np.uint8)


def _read_meta(path: Path, text: str) -> tuple[dict, np.ndarray]:
    """The anncli metadata of an exported file and its palette (K x 3 uint8); a malformed one is one line."""
    try:
        meta = json.loads(text)
        palette = np.asarray(meta["palette"])
        ok = palette.ndim == 2 and palette.shape[1] == 3 and len(palette) > 0 and ((palette >= 0) & (palette <= 255)).all()
    except (ValueError, TypeError, KeyError, IndexError):
        ok = False
    if not ok:
        raise UserError(f"--model {path}: its anncli metadata is malformed (expected JSON with a palette of "
                        "[r, g, b] rows); export it again with `ann export --format onnx`")
    return meta, palette.astype(np.uint8)


def model_dataset(meta: dict) -> str:
    """The dataset an exported model was trained on: its metadata's, else the dataset whose classes it has
    (files exported before the metadata named it)."""
    if meta.get("dataset"):
        return meta["dataset"]
    from anncli.data.datasets import class_names

    for name in ("cityscapes", "ade20k"):
        if [c.strip() for c in meta.get("classes", [])] == class_names(name):
            return name
    return "unknown"


def run_onnx_predict(images, model: Path, out: Path, fmt: str = "train-ids", colors=None,
                     overlay=None) -> tuple[list[Path], list[Path]]:
    """Segment the images with the ONNX model: ids in the format `fmt` into `out`, pictures where
    PredictionPlaces puts them; an image that cannot be read is reported on stderr and skipped, like
    `ann predict --checkpoint`. Returns the written paths and the skipped images."""
    from anncli.eval.formats import PredictionPlaces, pred_format

    segmenter = OnnxSegmenter(Path(model))
    classes = len(segmenter.palette)
    places = PredictionPlaces.choose(out, pred_format(fmt, model_dataset(segmenter.meta), classes), colors, overlay)
    paths = expand_images(images)
    places.check_inputs(paths)
    places.make()
    written: list[Path] = []
    failed: list[Path] = []
    for path in paths:
        try:
            image = read_rgb(path)
        except UserError as e:
            failed.append(path)
            print(f"ann: skipped {e}", file=sys.stderr, flush=True)
            continue
        written += places.write(path.stem, image, segmenter.labels(image), segmenter.palette)
    skipped = f"; {len(failed)} could not be read" if failed else ""
    print(f"{len(paths) - len(failed)} of {len(paths)} image(s) segmented with {model} (onnxruntime CPU) into "
          f"{out}{skipped}")
    return written, failed
