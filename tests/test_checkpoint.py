"""Run-directory layout: only complete checkpoints count, retention, compatibility errors."""

import pytest
import torch

from anncli import checkpoint as ck
from anncli.errors import UserError
from anncli.recipe import Recipe


def _save(run_dir, step, keep_last=2, model=None):
    tmp = ck.begin_save(run_dir, step)
    ck.save_torch({"w": torch.full((2,), float(step))}, tmp / "model.pt")
    ck.save_json({"step": step, "model": (model or Recipe(name="t").model).model_dump(mode="json")}, tmp / "state.json")
    return ck.finish_save(run_dir, step, keep_last)


def test_layout_marker_and_latest(tmp_path):
    path = _save(tmp_path, 400)
    assert path == tmp_path / "checkpoints" / "step-000400"
    assert (path / "COMPLETE").read_text().strip() == "400"
    assert ck.latest_checkpoint(tmp_path) == path
    assert ck.resolve_resume("auto", tmp_path) == path
    assert ck.resolve_resume("never", tmp_path) is None


def test_interrupted_save_leaves_previous_in_use(tmp_path):
    good = _save(tmp_path, 200)
    # A save killed before rename: only the staging dir exists.
    tmp = ck.begin_save(tmp_path, 400)
    ck.save_torch({"w": torch.zeros(2)}, tmp / "model.pt")
    # A save killed after rename, before the marker.
    (tmp_path / "checkpoints" / "step-000600").mkdir()
    assert ck.latest_checkpoint(tmp_path) == good
    with pytest.raises(UserError, match="incomplete"):
        ck.resolve_resume(str(tmp_path / "checkpoints" / "step-000600"), tmp_path)
    # The next save of a step cleans the leftovers.
    assert ck.latest_checkpoint(tmp_path) == good
    _save(tmp_path, 600)
    assert not (tmp_path / "checkpoints" / ".tmp-step-000400").exists()
    assert ck.latest_checkpoint(tmp_path).name == "step-000600"


def test_keep_last(tmp_path):
    for step in (100, 200, 300, 400):
        _save(tmp_path, step, keep_last=2)
    assert [p.name for p in ck.complete_checkpoints(tmp_path)] == ["step-000300", "step-000400"]


def test_incompatible_model_is_one_line(tmp_path):
    path = _save(tmp_path, 100)
    other = Recipe(name="t", model={"num_classes": 5})
    with pytest.raises(UserError, match=r"model.num_classes=19 \(recipe: 5\)"):
        ck.load_model_for_inference(path, other)
    # norm and pretrained do not change what the weights mean
    same = Recipe(name="t", model={"norm": "bn", "pretrained": "x.pth"})
    assert torch.equal(ck.load_model_for_inference(path, same)["w"], torch.full((2,), 100.0))


def test_missing_checkpoint_path(tmp_path):
    with pytest.raises(UserError, match="no such directory"):
        ck.resolve_resume(str(tmp_path / "nope"), tmp_path)


def test_run_directory_lock_excludes_a_second_run(tmp_path):
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from anncli.checkpoint import lock_run_dir; "
        f"h = lock_run_dir({str(tmp_path)!r}, 5); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"in use by pid {holder.pid}"):
            ck.lock_run_dir(tmp_path, 1)
    finally:
        holder.kill()
        holder.wait()
    ck.lock_run_dir(tmp_path, 5).close()  # the kernel released the dead holder's lock
