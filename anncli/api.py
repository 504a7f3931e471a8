"""The Python entry point: `from anncli import load_model`.

    model = load_model("runs/x/checkpoints/step-060000")   # or a `ann weights import` directory
    logits = model(x)                                       # x: normalised float N×3×H×W -> N×C×H×W
"""

from __future__ import annotations

from pathlib import Path


def load_model(checkpoint: str | Path, device: str = "cpu"):
    """The checkpoint's network, built from the recipe saved with it, in eval mode on `device`.

    In eval mode the network returns the main logits resized to the input (bilinear; align_corners
    True for the official variant, False for the mmseg variant unless its recipe says otherwise).
    The input is normalised as the checkpoint's recipe says (`augment.mean`, `augment.std`, `augment.bgr`).
    """
    import torch

    from anncli.runs.checkpoint import checkpoint_recipe
    from anncli.eval.inference import load_model as load_checkpoint_model
    from anncli.recipe import load_recipe

    path = Path(checkpoint)
    return load_checkpoint_model(load_recipe(checkpoint_recipe(path)), path, torch.device(device))
