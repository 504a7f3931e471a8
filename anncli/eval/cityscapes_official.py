"""`python -m anncli.eval.cityscapes_official`: cityscapesScripts' csEvalPixelLevelSemanticLabeling as it
ships, runnable in the environment ann pins.

The official script reads the same environment variables (CITYSCAPES_DATASET, CITYSCAPES_RESULTS,
CITYSCAPES_EXPORT_DIR) and arguments; two things stop it there, and this wrapper supplies them:

- cityscapesScripts 2.3.0 calls `numpy.in1d`, which numpy 2.4 removed. `numpy.isin(...).ravel()` is what
  `in1d` computed (a flat boolean array), and only that is put in its place, only where it is missing.
- a CITYSCAPES_EXPORT_DIR that does not exist yet is refused by the script; it is created here first.

Everything else, the scores and the JSON it exports included, is the official module's own doing.
"""

from __future__ import annotations

import os
import runpy
import sys

OFFICIAL = "cityscapesscripts.evaluation.evalPixelLevelSemanticLabeling"


def _in1d(values, test_values, assume_unique=False, invert=False):
    import numpy as np

    return np.isin(values, test_values, assume_unique=assume_unique, invert=invert).ravel()


def prepare() -> None:
    """What the official script needs before it is imported: numpy.in1d and the export folder."""
    import numpy as np

    if not hasattr(np, "in1d"):
        np.in1d = _in1d
    export_dir = os.environ.get("CITYSCAPES_EXPORT_DIR")
    if export_dir:
        os.makedirs(export_dir, exist_ok=True)


def main() -> int:
    try:
        import cityscapesscripts  # noqa: F401

        prepare()
    except ImportError:
        return _fail("the official Cityscapes evaluation needs cityscapesscripts: pip install 'anncli[cityscapes]'")
    except OSError as e:
        return _fail(f"CITYSCAPES_EXPORT_DIR {e.filename}: cannot create it ({e.strerror})")
    runpy.run_module(OFFICIAL, run_name="__main__", alter_sys=True)
    return 0


def _fail(message: str) -> int:
    print(f"ann: error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
