"""Run-directory layout: only complete checkpoints count, retention, compatibility errors, and the
`Checkpointer` protocol (save → load) with the real DDP engine and data stream in one process."""

import hashlib
import json
import os

import pytest
import torch

from anncli.runs import checkpoint as ck
from anncli.runs import integrity, locks, retention, rundir, staging
from anncli.errors import UserError
from anncli.recipe import Recipe


class _Weights(torch.nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((2,), value))


def _parts(value: float, **recipe):
    """A recipe, and the real engine and data stream a run of it checkpoints (the shard is never read)."""
    from anncli.data.global_stream import GlobalStream
    from anncli.cluster.distributed import DistInfo
    from anncli.train.engine import DDPEngine

    recipe = Recipe(name="t", **recipe)
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    engine = DDPEngine(_Weights(value), recipe, info)
    stream = GlobalStream(["unused-000000.tar"], [10], augment=recipe.augment, batch_size=2, effective_batch=2, seed=3,
                          rank=0, world_size=1)
    return recipe, info, engine, stream


def _save(run_dir, step, keep_last=2, bad_steps_total=0):
    recipe, info, engine, stream = _parts(float(step), train={"keep_last": keep_last})
    return ck.Checkpointer(run_dir, recipe, info).save(step, engine, stream, bad_steps_total=bad_steps_total)


def test_layout_marker_and_latest(tmp_path):
    path = _save(tmp_path, 400)
    assert path == tmp_path / "checkpoints" / "step-000400"
    marker = json.loads((path / "COMPLETE").read_text())
    assert marker["step"] == 400
    assert marker["files"]["model.pt"]["sha256"] == hashlib.sha256((path / "model.pt").read_bytes()).hexdigest()
    assert sorted(marker["files"]) == sorted(p.name for p in path.iterdir() if p.name != "COMPLETE")
    assert rundir.latest_checkpoint(tmp_path) == path
    assert rundir.resolve_resume("auto", tmp_path) == path
    assert rundir.resolve_resume("never", tmp_path) is None


def test_interrupted_save_leaves_previous_in_use(tmp_path):
    good = _save(tmp_path, 200)
    # A save killed before rename: only the staging dir exists.
    tmp = staging.begin_save(tmp_path, 400)
    ck.save_torch({"w": torch.zeros(2)}, tmp / "model.pt")
    # A save killed after rename, before the marker.
    (tmp_path / "checkpoints" / "step-000600").mkdir()
    assert rundir.latest_checkpoint(tmp_path) == good
    with pytest.raises(UserError, match="incomplete"):
        rundir.resolve_resume(str(tmp_path / "checkpoints" / "step-000600"), tmp_path)
    # The next save of a step cleans the leftovers.
    assert rundir.latest_checkpoint(tmp_path) == good
    _save(tmp_path, 600)
    assert not (tmp_path / "checkpoints" / ".tmp-step-000400").exists()
    assert rundir.latest_checkpoint(tmp_path).name == "step-000600"


def test_keep_last(tmp_path):
    for step in (100, 200, 300, 400):
        _save(tmp_path, step, keep_last=2)
    assert [p.name for p in rundir.complete_checkpoints(tmp_path)] == ["step-000300", "step-000400"]


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
        rundir.resolve_resume(str(tmp_path / "nope"), tmp_path)


def test_run_directory_lock_excludes_a_second_run(tmp_path):
    import subprocess
    import sys

    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from anncli.runs.locks import lock_run_dir; "
        f"h = lock_run_dir({str(tmp_path)!r}, 5); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(UserError, match=f"in use by pid {holder.pid}"):
            locks.lock_run_dir(tmp_path, 1)
    finally:
        holder.kill()
        holder.wait()
    locks.lock_run_dir(tmp_path, 5).close()  # the kernel released the dead holder's lock


def test_save_then_load_gives_back_every_part(tmp_path):
    recipe, info, engine, stream = _parts(300.0, train={"keep_last": 2})
    stream.seek_step(7)
    path = ck.Checkpointer(tmp_path, recipe, info).save(300, engine, stream, bad_steps_total=4)
    # nothing per rank: the data position is world-free and the RNG is reseeded every step
    assert sorted(p.name for p in path.iterdir()) == ["COMPLETE", "data.json", "model.pt", "optim.pt",
                                                     "recipe.yaml", "state.json"]
    recipe, info, engine, stream = _parts(0.0, train={"keep_last": 2})
    resumed = ck.Checkpointer(tmp_path, recipe, info).load(path, engine, stream)
    assert (resumed.step, resumed.bad_steps_total, resumed.world_size) == (300, 4, 1)
    assert torch.equal(engine.module.w.detach(), torch.full((2,), 300.0))
    assert stream.next_micro_batch == 7
    assert ck.read_state(path)["world_size"] == 1 and ck.saved_effective_batch(path) == 2


def test_another_world_loads_when_the_effective_batch_is_kept(tmp_path):
    from anncli.data.global_stream import GlobalStream

    path = _save(tmp_path, 100)
    recipe, info, engine, stream = _parts(0.0)
    two = type(info)(rank=1, world_size=2, local_rank=1, device=info.device)
    split2 = GlobalStream(["unused-000000.tar"], [10], augment=recipe.augment, batch_size=1, effective_batch=2,
                          seed=3, rank=1, world_size=2)
    assert ck.Checkpointer(tmp_path, recipe, two).load(path, engine, split2).world_size == 1
    other = GlobalStream(["unused-000000.tar"], [10], augment=recipe.augment, batch_size=2, effective_batch=4,
                         seed=3, rank=1, world_size=2)
    with pytest.raises(UserError, match="effective batch 2, this run splits 4"):
        ck.Checkpointer(tmp_path, recipe, two).load(path, engine, other)


def test_load_refuses_another_engine(tmp_path):
    path = _save(tmp_path, 100)
    recipe, info, engine, stream = _parts(0.0, engine="deepspeed")
    with pytest.raises(UserError, match="written by engine ddp, the recipe uses deepspeed"):
        ck.Checkpointer(tmp_path, recipe, info).load(path, engine, stream)


DAMAGE = {
    "random bytes": lambda f: f.write_bytes(os.urandom(f.stat().st_size)),
    "truncated": lambda f: f.write_bytes(f.read_bytes()[: f.stat().st_size // 2]),
    "empty": lambda f: f.write_bytes(b""),
    "missing": lambda f: f.unlink(),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_model_is_one_line_and_auto_falls_back(tmp_path, damage, capsys):
    older = _save(tmp_path, 100, keep_last=3)
    newer = _save(tmp_path, 200, keep_last=3)
    DAMAGE[damage](newer / "model.pt")
    recipe = Recipe(name="t")
    with pytest.raises(integrity.DamagedCheckpoint, match=f"checkpoint {newer} is damaged: model.pt") as err:
        ck.load_model_for_inference(newer, recipe)
    assert "weights_only" not in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(UserError, match="is damaged"):
        rundir.resolve_resume(str(newer), tmp_path)
    assert rundir.resolve_resume("auto", tmp_path) == older
    assert f"warning: checkpoint {newer} is damaged" in capsys.readouterr().err
    DAMAGE[damage](older / "model.pt")
    with pytest.raises(UserError, match="every checkpoint under .* is damaged"):
        rundir.resolve_resume("auto", tmp_path)


def test_unverifiable_files_still_fail_in_one_line(tmp_path, capsys):
    """A checkpoint from before checksums (marker without them) loads with a note; damage there is one line."""
    path = _save(tmp_path, 100)
    (path / "COMPLETE").write_text("100\n")
    assert torch.equal(ck.load_model_for_inference(path, Recipe(name="t"))["w"], torch.full((2,), 100.0))
    assert "marker without checksums" in capsys.readouterr().err
    (path / "model.pt").write_bytes(b"not a zip")
    with pytest.raises(integrity.DamagedCheckpoint, match="model.pt cannot be read as a tensor file") as err:
        ck.load_model_for_inference(path, Recipe(name="t"))
    assert "weights_only" not in str(err.value)
    (path / "COMPLETE").write_text("")
    (path / "model.pt").unlink()
    with pytest.raises(integrity.DamagedCheckpoint, match="model.pt is missing"):
        ck.load_model_for_inference(path, Recipe(name="t"))


def test_resume_never_refuses_and_fresh_moves_aside(tmp_path):
    path = _save(tmp_path, 100)
    (tmp_path / "events.jsonl").write_text("{}\n")
    with pytest.raises(UserError, match=f"newest {path}.*another --work-dir, or --fresh"):
        rundir.decide_start(tmp_path, "never")
    assert rundir.decide_start(tmp_path, "never", fresh=True) is None
    assert rundir.complete_checkpoints(tmp_path) == [] and not (tmp_path / "events.jsonl").exists()
    [aside] = tmp_path.glob("superseded-*")
    assert (aside / "checkpoints" / "step-000100" / "COMPLETE").is_file() and (aside / "events.jsonl").is_file()
    assert rundir.decide_start(tmp_path, "never") is None  # nothing left to mix with


def test_resume_from_an_older_checkpoint_moves_the_newer_aside(tmp_path):
    for step in (100, 200, 300):
        _save(tmp_path, step, keep_last=3)
    older = rundir.checkpoint_path(tmp_path, 100)
    assert rundir.decide_start(tmp_path, str(older)) == older
    assert len(rundir.complete_checkpoints(tmp_path)) == 3  # nothing moves before the resume is accepted
    rundir.supersede_newer(tmp_path, older)
    assert [p.name for p in rundir.complete_checkpoints(tmp_path)] == ["step-000100"]
    [aside] = tmp_path.glob("superseded-*")
    assert sorted(p.name for p in (aside / "checkpoints").iterdir()) == ["step-000200", "step-000300"]
    assert rundir.decide_start(tmp_path, "auto") == older  # a requeue continues from where the run went on


def test_a_restarted_worker_of_the_same_launch_continues(tmp_path, monkeypatch):
    """--fresh / --resume never apply once per launch: torchrun's restarts continue that launch's run."""
    _save(tmp_path, 100)
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-a")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "0")
    assert rundir.decide_start(tmp_path, "never", fresh=True) is None
    mine = _save(tmp_path, 4)
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    assert rundir.decide_start(tmp_path, "never", fresh=True) == mine
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "launch-b")  # another launch: the decision applies again
    with pytest.raises(UserError, match="already holds checkpoints"):
        rundir.decide_start(tmp_path, "never")


def test_recipe_changes_are_sorted_into_harmless_and_breaking():
    from anncli.recipe import recipe_to_yaml
    from anncli.runs.rundir import recipe_changes

    old = Recipe(name="t")
    new = Recipe(name="t", train={"iters": 99, "log_every": 7, "batch_size": 4}, optim={"lr": 2.5},
                 data={"num_workers": 0})
    harmless, breaking = recipe_changes(recipe_to_yaml(old), recipe_to_yaml(new))
    # the global order does not depend on the worker count (tests/data/test_data_order.py)
    # the split of the checkpoint's effective batch adapts to train.batch_size (plan.run_split)
    assert harmless == ["data.num_workers: 4 -> 0", "train.batch_size: 1 -> 4", "train.iters: 60000 -> 99",
                        "train.log_every: 50 -> 7"]
    assert breaking == ["optim.lr: 0.01 -> 2.5"]


def test_a_new_batch_split_and_removed_keys_are_harmless_unless_the_lr_scales_with_the_batch():
    import yaml

    from anncli.recipe import recipe_to_yaml
    from anncli.runs.rundir import recipe_changes

    old = Recipe(name="t", train={"batch_size": 4, "accum_steps": 1})
    resplit = Recipe(name="t", train={"batch_size": 2, "accum_steps": 2, "trace_samples": True})
    harmless, breaking = recipe_changes(recipe_to_yaml(old), recipe_to_yaml(resplit))
    assert breaking == []
    assert harmless == ["train.accum_steps: 1 -> 2", "train.batch_size: 4 -> 2", "train.trace_samples: False -> True"]
    linear = Recipe(name="t", train={"batch_size": 4, "accum_steps": 1, "lr_scaling": "linear"})
    bigger = Recipe(name="t", train={"batch_size": 4, "accum_steps": 2, "lr_scaling": "linear"})
    assert recipe_changes(recipe_to_yaml(linear), recipe_to_yaml(bigger))[1] == [
        "train.accum_steps: 1 -> 2 (the linearly scaled LR changes)"]
    same_effective = Recipe(name="t", train={"batch_size": 2, "accum_steps": 2, "lr_scaling": "linear"})
    assert recipe_changes(recipe_to_yaml(linear), recipe_to_yaml(same_effective)) == (
        ["train.accum_steps: 1 -> 2", "train.batch_size: 4 -> 2"], [])
    saved = yaml.safe_load(recipe_to_yaml(old))
    saved["data"]["shuffle_buffer"] = 256  # written before the global order replaced the shuffle buffer
    assert recipe_changes(yaml.safe_dump(saved), recipe_to_yaml(old)) == (
        ["data.shuffle_buffer: 256 (no longer a recipe key)"], [])
    with_synth = recipe_to_yaml(Recipe(name="t", data={"dataset": "synth", "synth": {}}))
    without = recipe_to_yaml(Recipe(name="t", data={"dataset": "synth"}))  # a section set to null is no removal
    for a, b in ((with_synth, without), (without, with_synth)):
        harmless, breaking = recipe_changes(a, b)
        assert harmless == [] and any(line.startswith("data.synth.train: ") for line in breaking)


def test_load_refuses_a_recipe_change_that_breaks_exact_resume(tmp_path, capsys):
    path = _save(tmp_path, 100)
    recipe, info, engine, stream = _parts(0.0, train={"keep_last": 2}, optim={"lr": 0.5})
    with pytest.raises(UserError, match=r"optim.lr: 0.01 -> 0.5.*--allow-recipe-change"):
        ck.Checkpointer(tmp_path, recipe, info).load(path, engine, stream)
    ck.Checkpointer(tmp_path, recipe, info).load(path, engine, stream, allow_recipe_change=True)
    assert "optim.lr: 0.01 -> 0.5 (allowed by --allow-recipe-change)" in capsys.readouterr().err
    recipe, info, engine, stream = _parts(0.0, train={"keep_last": 5, "iters": 7})
    ck.Checkpointer(tmp_path, recipe, info).load(path, engine, stream)
    assert "train.iters: 60000 -> 7; train.keep_last: 2 -> 5" in capsys.readouterr().err


def _find_on_each_rank(base: str, resume: str) -> None:
    from anncli.cluster.distributed import init_distributed, teardown

    info = init_distributed()
    view = os.path.join(base, f"rank{info.rank}")  # each rank sees its own (different) file system state
    try:
        answer = str(ck.Checkpointer(view, Recipe(name="t"), info).find(resume))
    except UserError as e:
        answer = f"error: {e}"
    with open(os.path.join(base, f"answer{info.rank}"), "w") as f:
        f.write(answer)
    teardown()


def test_rank_0_decides_the_checkpoint_for_every_rank(tmp_path):
    import uuid

    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    older = _save(tmp_path / "rank0", 100, keep_last=3)
    newer = _save(tmp_path / "rank0", 200, keep_last=3)
    (newer / "model.pt").write_bytes(b"")
    _save(tmp_path / "rank1", 300)  # what a stale cache could show another node
    cfg = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=2, run_id=str(uuid.uuid4()),
                       rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1)
    for resume, want in (("auto", str(older)), ("never", f"error: {tmp_path / 'rank0'} already holds checkpoints")):
        elastic_launch(cfg, entrypoint=_find_on_each_rank)(str(tmp_path), resume)
        answers = [(tmp_path / f"answer{r}").read_text() for r in (0, 1)]
        assert answers[0] == answers[1] and answers[0].startswith(want), answers


@pytest.mark.parametrize("where", ["weight", "buffer"])
def test_a_non_finite_model_is_never_saved_and_the_last_good_checkpoint_is_named(tmp_path, where):
    good = _save(tmp_path, 100)
    recipe, info, engine, stream = _parts(200.0)
    if where == "weight":
        engine.module.w.data[1] = float("nan")
    else:
        engine.module.register_buffer("running_var", torch.tensor([1.0, float("inf")]))
    with pytest.raises(UserError, match=rf"step 200: the model's (w|running_var) hold non-finite values; no "
                                        rf"checkpoint written, the run stops. Last good checkpoint: {good}"):
        ck.Checkpointer(tmp_path, recipe, info).save(200, engine, stream)
    assert rundir.complete_checkpoints(tmp_path) == [good]
    assert not staging.staging_dir(tmp_path, 200).exists()


def test_pruning_keeps_the_checkpoint_just_written_and_moves_a_damaged_one_aside(tmp_path, capsys):
    """Resumed from 100 past a damaged 200, the run saves 150 with keep_last 1: 150 stays, 200 goes aside."""
    _save(tmp_path, 100, keep_last=3)
    damaged = _save(tmp_path, 200, keep_last=3)
    (damaged / "model.pt").write_bytes(b"bit rot")
    written = _save(tmp_path, 150, keep_last=1)
    assert rundir.complete_checkpoints(tmp_path) == [written]
    assert rundir.resolve_resume("auto", tmp_path) == written
    aside = list(tmp_path.glob("superseded-*/checkpoints/step-000200"))
    assert len(aside) == 1 and (aside[0] / "model.pt").read_bytes() == b"bit rot"
    assert "not counted by train.keep_last" in capsys.readouterr().err


def _hold(checkpoint, how: str):
    """A real process holding `checkpoint`'s read lock (`reading`) or its prune lock until stdin closes."""
    import subprocess
    import sys

    code = {"read": f"from anncli.runs.retention import reading\nwith reading({str(checkpoint)!r}):\n",
            "prune": f"from anncli.runs.locks import try_lock\nwith try_lock({str(checkpoint / '.readers')!r}, False):\n"}
    proc = subprocess.Popen([sys.executable, "-c", code[how] + "    print('held', flush=True); input()"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_prune_keeps_a_checkpoint_that_is_being_read_until_the_reader_is_done(tmp_path, capsys):
    first = _save(tmp_path, 100, keep_last=1)
    reader = _hold(first, "read")
    try:
        _save(tmp_path, 200, keep_last=1)
        assert first in rundir.complete_checkpoints(tmp_path)
        assert f"keeping {first} beyond train.keep_last for now: it is being read" in capsys.readouterr().err
    finally:
        reader.communicate("\n", timeout=60)
    last = _save(tmp_path, 300, keep_last=1)
    assert rundir.complete_checkpoints(tmp_path) == [last]


def test_readers_wait_for_a_prune_under_way_and_say_so(tmp_path, monkeypatch):
    path = _save(tmp_path, 100)
    pruner = _hold(path, "prune")
    monkeypatch.setenv("ANN_LOCK_TIMEOUT", "0.3")
    try:
        with pytest.raises(UserError, match=f"checkpoint {path} is being deleted by pid {pruner.pid}"):
            ck.load_model_for_inference(path, Recipe(name="t"))
    finally:
        pruner.communicate("\n", timeout=60)
    assert torch.equal(ck.load_model_for_inference(path, Recipe(name="t"))["w"], torch.full((2,), 100.0))


@pytest.mark.parametrize("marker", ["x", "\0" * 64, "[1, 2]"])
def test_a_garbled_marker_is_damage_not_a_reason_to_skip_verification(tmp_path, marker):
    path = _save(tmp_path, 100)
    (path / "COMPLETE").write_text(marker)
    with pytest.raises(integrity.DamagedCheckpoint, match=f"checkpoint {path} is damaged: its COMPLETE marker is neither"):
        ck.load_model_for_inference(path, Recipe(name="t"))


def test_without_flock_locks_fall_back_to_o_excl_files_and_say_so(tmp_path, monkeypatch, capsys):
    import errno


    def nfs_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(locks, "flock", nfs_flock)
    held = locks.lock_run_dir(tmp_path, 1)
    assert (tmp_path / ".lock.held").read_text().startswith(f"pid {os.getpid()} on ")
    with pytest.raises(UserError, match=f"in use by pid {os.getpid()} on .* \\(lock file {tmp_path}/.lock.held\\)"):
        locks.lock_run_dir(tmp_path, 0)
    held.close()
    assert not (tmp_path / ".lock.held").exists()
    (tmp_path / ".lock.held").write_text(f"pid 999999999 on {os.uname().nodename}\n")  # killed holder, this host
    locks.lock_run_dir(tmp_path, 0).close()
    err = capsys.readouterr().err
    assert err.count("does not support flock (ENOLCK: NFS/Lustre without locking); using O_EXCL lock files") == 1
    # Read locks too: prune keeps a checkpoint with a reader file.
    first = _save(tmp_path, 100, keep_last=1)
    with retention.reading(first):
        _save(tmp_path, 200, keep_last=1)
        assert first in rundir.complete_checkpoints(tmp_path)
    last = _save(tmp_path, 300, keep_last=1)
    assert rundir.complete_checkpoints(tmp_path) == [last] and not list(tmp_path.glob("checkpoints/*/.readers*"))
