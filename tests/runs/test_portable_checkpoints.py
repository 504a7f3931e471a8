"""Checkpoints name no module of ours inside their pickles, so moving a module never breaks a saved run.

torch.save pickles tensors and plain containers; a class or function of `anncli` pickled into a
checkpoint would be stored by its import path and fail to load once that module moves.
"""

from __future__ import annotations

import io
import pickletools
import zipfile
from pathlib import Path

from conftest import run_ann, tiny_overrides


def pickled_names(data: bytes) -> set[str]:
    """Every string a pickle pushes, the module and class names of its GLOBAL opcodes included."""
    names = set()
    for opcode, arg, _ in pickletools.genops(io.BytesIO(data)):
        if isinstance(arg, str):
            names.add(arg)
    return names


def checkpoint_pickles(path: Path) -> dict[str, bytes]:
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return {f"{path}:{n}": z.read(n) for n in z.namelist() if n.endswith(".pkl")}
    return {str(path): path.read_bytes()}


def test_a_module_path_in_a_pickle_is_seen():
    import pickle

    from anncli.errors import UserError

    assert any(n.startswith("anncli") for n in pickled_names(pickle.dumps(UserError("x"))))


def test_written_checkpoints_pickle_no_anncli_module(tmp_path):
    run = tmp_path / "run"
    done = run_ann("train", "recipes/demo.yaml", "--work-dir", run, *tiny_overrides(tmp_path / "data",
                   **{"train.iters": 2, "train.checkpoint_every": 2}))
    assert done.returncode == 0, done.stderr[-2000:]
    files = sorted((run / "checkpoints").rglob("*.pt"))
    assert {f.name for f in files} >= {"model.pt", "optim.pt"}
    leaks = {name: sorted(n for n in pickled_names(data) if n.startswith("anncli"))
             for f in files for name, data in checkpoint_pickles(f).items()}
    assert {k: v for k, v in leaks.items() if v} == {}
