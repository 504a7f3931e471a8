"""Image files and image bytes: finding the image files a user names, reading one for prediction, and
decoding a sample's image and label, each sized from its header (`guards.Limits`) before it is decoded.
No torch here: the ONNX predictor runs without it."""

from __future__ import annotations

import glob
import io
import warnings
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from anncli.data.guards import Limits, SampleError, hw_text
from anncli.errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


def _quiet_cv2() -> None:
    # A corrupt image is reported by us in one line; cv2 would add its own multi-line log to stderr.
    try:
        cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    except AttributeError:
        pass


_quiet_cv2()


def expand_images(items) -> list[Path]:
    """Files, directories (searched recursively) and globs, in order, without repeats."""
    found: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            matches = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        elif path.is_file():
            matches = [path]
        else:
            matches = sorted(Path(p) for p in glob.glob(item, recursive=True) if Path(p).is_file())
        if not matches:
            raise UserError(f"{item}: no such image file, or no image matches")
        found.extend(m for m in matches if m not in found)
    return found


def read_rgb(path: Path) -> np.ndarray:
    """uint8 HxWx3 RGB of an image file; a UserError (one line) for a file PIL cannot or will not decode."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # big pictures are the user's to give
            with Image.open(path) as img:
                return np.asarray(img.convert("RGB"))
    except Image.DecompressionBombError:
        raise UserError(f"{path}: cannot read the image: more than {2 * Image.MAX_IMAGE_PIXELS:,} pixels "
                        "(PIL's decompression-bomb limit)") from None
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the image ({e.__class__.__name__})") from None


def decode_image(data: bytes, limits: Limits = Limits()) -> np.ndarray:
    """uint8 HxWx3 RGB of an image field; SampleError when it is unsized, over the cap or undecodable."""
    hw = limits.check_pixels("image", data)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    if img is None:
        raise SampleError("image cannot be decoded")
    _check_decoded("image", img, hw)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def decode_label(data: bytes, limits: Limits = Limits()) -> np.ndarray:
    """The stored ids, never colour-converted; 'L' PNGs go through cv2, anything else ('P') through PIL."""
    hw = limits.check_pixels("label", data)
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 25 and data[24] == 8 and data[25] == 0:
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    else:
        try:
            with Image.open(io.BytesIO(data)) as im:
                arr = np.array(im) if im.mode in ("L", "P") else None
        except Exception:
            arr = None
    if arr is None or arr.dtype != np.uint8 or arr.ndim != 2:
        raise SampleError("label is not a decodable 8-bit single-channel PNG")
    _check_decoded("label", arr, hw)
    return arr


def _check_decoded(field: str, arr: np.ndarray, hw: tuple[int, int]) -> None:
    """The decoder's size is the header's: a file whose header lies about it is refused."""
    if arr.shape[:2] != tuple(hw):
        raise SampleError(f"{field} decodes to {hw_text(arr.shape)} but its header says {hw_text(hw)} (HxW)")
