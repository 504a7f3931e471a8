"""Run-directory layout: only complete checkpoints count, retention, compatibility errors, and the
`Checkpointer` protocol (save → load) with the real DDP engine and data stream in one process."""

import pytest
import torch

from anncli import checkpoint as ck
from anncli import runlock
from anncli.errors import UserError
from anncli.recipe import Recipe


class _Weights(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((2,), value))


def _parts(value: float, **recipe):
    """A recipe, and the real engine and data stream a run of it checkpoints (the shard is never read)."""
    from anncli.data.stream import TrainStream
    from anncli.distributed import DistInfo
    from anncli.engine import DDPEngine

    recipe = Recipe(name="t", **recipe)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    engine = DDPEngine(_Weights(value), recipe, info)
    stream = TrainStream(["unused-000000.tar"], augment=recipe.augment, batch_size=2, seed=3, rank=0, world_size=1)
    return recipe, info, engine, stream


def _save(run_dir, step, keep_last=2, bad_steps_total=0):
    recipe, info, engine, stream = _parts(float(step), train={"keep_last": keep_last})
    return ck.Checkpointer(run_dir, recipe, info).save(step, engine, stream, bad_steps_total=bad_steps_total)


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
        "import sys, time; from anncli.runlock import lock_run_dir; "
        f"h = lock_run_dir({str(tmp_path)!r}, 5); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"in use by pid {holder.pid}"):
            runlock.lock_run_dir(tmp_path, 1)
    finally:
        holder.kill()
        holder.wait()
    runlock.lock_run_dir(tmp_path, 5).close()  # the kernel released the dead holder's lock


def test_save_then_load_gives_back_every_part(tmp_path):
    torch.manual_seed(11)
    path = _save(tmp_path, 300, bad_steps_total=4)
    rng_after_save = torch.rand(3)
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "data-rank00000.json", "model.pt", "optim.pt",
                                                     "recipe.yaml", "rng-rank00000.pt", "state.json"]
    recipe, info, engine, stream = _parts(0.0, train={"keep_last": 2})
    stream._batches = 99
    resumed = ck.Checkpointer(tmp_path, recipe, info).load(path, engine, stream)
    assert (resumed.step, resumed.bad_steps_total) == (300, 4)
    assert torch.equal(engine.module.w.detach(), torch.full((2,), 300.0))
    assert stream.batches == 0
    ck.restore_rng(resumed.rng)
    assert torch.equal(torch.rand(3), rng_after_save)
    assert ck.read_state(path)["world_size"] == 1


def test_load_refuses_another_world_size_or_engine(tmp_path):
    path = _save(tmp_path, 100)
    recipe, info, engine, stream = _parts(0.0)
    two = type(info)(rank=0, world_size=2, local_rank=0, device=info.device)
    with pytest.raises(UserError, match="written by 1 ranks, this run has 2"):
        ck.Checkpointer(tmp_path, recipe, two).load(path, engine, stream)
    recipe, info, engine, stream = _parts(0.0, engine="deepspeed")
    with pytest.raises(UserError, match="written by engine ddp, the recipe uses deepspeed"):
        ck.Checkpointer(tmp_path, recipe, info).load(path, engine, stream)
