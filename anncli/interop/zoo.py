"""Weights by name: the one table of `open-mmlab://NAME` backbones and `mmseg://CONFIG` model-zoo rows.

`open-mmlab://resnet50_v1c` is what mmsegmentation's configs write for the ImageNet ResNetV1c weights
(mmcv's open_mmlab.json); `mmseg://ann_r101-d8_769x769_80k_cityscapes` is a row of mmsegmentation's ANN
model zoo (configs/ann/README.md): the released file, the recipe of the same config here, and the
published single-scale and multi-scale + flip mIoU. A row is also found by its recipe's name
(`mmseg://ann_r101-d8_4xb2-80k_cityscapes-769x769`, mmseg 1.x's config name).

No full SHA-256 of these files is published: a download is checked against the 8 hex digits of its file
name (torch.hub's convention, a prefix of the SHA-256). `sha256` holds the full digest where one is known
(none today). The README's "Weights by name" table shows these rows (tests/interop/test_zoo.py checks it).
Torch-free.
"""

from __future__ import annotations

import difflib
import re
from typing import NamedTuple, Optional

from anncli.errors import UserError

OPENMMLAB = "open-mmlab://"
MMSEG = "mmseg://"
SCHEMES = (OPENMMLAB, MMSEG)


class Named(NamedTuple):
    """One named file: `name` as the user writes it (with its scheme), where it is, and for a zoo row
    the recipe it was trained with and the mIoU mmseg published for it (single scale, ms + flip)."""
    name: str
    url: str
    sha256: Optional[str] = None
    recipe: Optional[str] = None
    miou: Optional[float] = None
    miou_ms_flip: Optional[float] = None


_THIRD_PARTY = "https://download.openmmlab.com/pretrain/third_party"
BACKBONES = [
    Named(OPENMMLAB + "resnet50_v1c", f"{_THIRD_PARTY}/resnet50_v1c-2cccc1ad.pth"),
    Named(OPENMMLAB + "resnet101_v1c", f"{_THIRD_PARTY}/resnet101_v1c-e67eebb6.pth"),
]

_ZOO = "https://download.openmmlab.com/mmsegmentation/v0.5/ann"
# (config, the file's time stamp and hash prefix, mIoU, mIoU ms+flip), as configs/ann/README.md lists them
_ROWS = [
    ("ann_r50-d8_512x1024_40k_cityscapes", "20200605_095211-049fc292", 77.40, 78.57),
    ("ann_r101-d8_512x1024_40k_cityscapes", "20200605_095243-adf6eece", 76.55, 78.85),
    ("ann_r50-d8_769x769_40k_cityscapes", "20200530_025712-2b46b04d", 78.89, 80.46),
    ("ann_r101-d8_769x769_40k_cityscapes", "20200530_025720-059bff28", 79.32, 80.94),
    ("ann_r50-d8_512x1024_80k_cityscapes", "20200607_101911-5a9ad545", 77.34, 78.65),
    ("ann_r101-d8_512x1024_80k_cityscapes", "20200607_013728-aceccc6e", 77.14, 78.81),
    ("ann_r50-d8_769x769_80k_cityscapes", "20200607_044426-cc7ff323", 78.88, 80.57),
    ("ann_r101-d8_769x769_80k_cityscapes", "20200607_013713-a9d4be8d", 78.80, 80.34),
    ("ann_r50-d8_512x512_80k_ade20k", "20200615_014818-26f75e11", 41.01, 42.30),
    ("ann_r101-d8_512x512_80k_ade20k", "20200615_014818-c0153543", 42.94, 44.18),
    ("ann_r50-d8_512x512_160k_ade20k", "20200615_231733-892247bc", 41.74, 42.62),
    ("ann_r101-d8_512x512_160k_ade20k", "20200615_231733-955eb1ec", 42.94, 44.06),
    ("ann_r50-d8_512x512_20k_voc12aug", "20200617_222246-dfcb1c62", 74.86, 76.13),
    ("ann_r101-d8_512x512_20k_voc12aug", "20200617_222246-2fad0042", 77.47, 78.70),
    ("ann_r50-d8_512x512_40k_voc12aug", "20200613_231314-b5dac322", 76.56, 77.51),
    ("ann_r101-d8_512x512_40k_voc12aug", "20200613_231314-bd205bbe", 76.70, 78.06),
]
_CONFIG = re.compile(r"(?P<arch>ann_r\d+-d8)_(?P<crop>\d+x\d+)_(?P<iters>\d+k)_(?P<data>[a-z0-9]+)$")


def recipe_of(config: str) -> str:
    """mmseg 1.x's name of a 0.x config, which is our recipe's: 4 GPUs x 2 images on Cityscapes, x 4 else."""
    m = _CONFIG.match(config)
    gpus = "4xb2" if m["data"] == "cityscapes" else "4xb4"
    return f"{m['arch']}_{gpus}-{m['iters']}_{m['data']}-{m['crop']}"


ZOO = [Named(MMSEG + config, f"{_ZOO}/{config}/{config}_{stamp}.pth", recipe=recipe_of(config), miou=miou,
             miou_ms_flip=ms_flip) for config, stamp, miou, ms_flip in _ROWS]


def is_name(text: str) -> bool:
    return text.startswith(SCHEMES)


def named(text: str) -> Named:
    """The entry of `open-mmlab://NAME` or `mmseg://CONFIG` (or mmseg://RECIPE); an unknown name is one
    line listing the known ones."""
    table = BACKBONES if text.startswith(OPENMMLAB) else ZOO
    for entry in table:
        if text in (entry.name, MMSEG + (entry.recipe or "")):
            return entry
    names = [e.name for e in table]
    close = difflib.get_close_matches(text, names, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    raise UserError(f"{text}: unknown name; {hint}`ann weights fetch --list` shows the {len(names)} "
                    f"{text.split('://', 1)[0]}:// names")
