"""The training step reads nothing back from the device except on log and checkpoint steps, and a
non-finite micro-batch is skipped on the device (anncli/train/skip.py) without leaving a trace.

The CPU test counts the real loop's host reads (every Tensor method that copies a value to Python or
to the host) over runs of different lengths; the CUDA test runs the real steps under
`torch.cuda.set_sync_debug_mode("error")`, which raises on any synchronising call.
"""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import torch
from torch import nn

from anncli.cluster.distributed import DistInfo
from anncli.recipe import LossConfig, Recipe, load_recipe
from conftest import ROOT, tiny_overrides

HOST_READS = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def counting_host_reads():
    """Counts calls of the Tensor methods that bring a value to the host, by name, while active."""
    counts = dict.fromkeys(HOST_READS, 0)
    originals = {name: getattr(torch.Tensor, name) for name in HOST_READS}

    def counted(name):
        def method(self, *args, **kwargs):
            counts[name] += 1
            return originals[name](self, *args, **kwargs)
        return method

    for name in HOST_READS:
        setattr(torch.Tensor, name, counted(name))
    try:
        yield counts
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def _set_up_run(tmp_path: Path, synth_root: Path, device: torch.device, **changes):
    from anncli.train.loop import StopFlag, TrainOptions, _set_up

    overrides = tiny_overrides(synth_root, **{"train.checkpoint_every": 1000, **changes})
    recipe = load_recipe(ROOT / "recipes" / "demo.yaml", overrides[1::2])
    info = DistInfo(rank=0, world_size=1, local_rank=0, device=device)
    opts = TrainOptions(recipe_path="recipes/demo.yaml", work_dir=tmp_path / f"run-{recipe.train.iters}")
    return _set_up(recipe, opts, info, StopFlag())


def _host_reads_of_a_run(tmp_path, synth_root, iters: int, log_every: int = 1000) -> dict:
    """A whole run of `iters` steps, logged every `log_every` steps and at its last step (where it also
    checkpoints).

    SGD, the Cityscapes recipes' optimizer: torch's AdamW keeps its step counter in a CPU tensor on every
    device and reads it with `.item()` each step, a host read that never touches a GPU (the CUDA test
    below runs the demo's AdamW)."""
    from anncli.train.loop import _loop

    run = _set_up_run(tmp_path, synth_root, torch.device("cpu"),
                      **{"train.iters": iters, "train.log_every": log_every, "optim.name": "sgd"})
    try:
        with counting_host_reads() as counts:
            assert _loop(run) == 0
    finally:
        run.close()
    return counts


def test_steps_between_log_steps_read_nothing_back(tmp_path, synth_root):
    torch.set_num_threads(1)
    short = _host_reads_of_a_run(tmp_path, synth_root, iters=2)
    long = _host_reads_of_a_run(tmp_path, synth_root, iters=7)
    assert sum(short.values()) > 0  # the log step's read and the checkpoint are counted
    assert long == short  # five more steps, not one more host read


def test_log_every_step_reads_once_per_step(tmp_path, synth_root):
    """The counter sees the loop's reads: logging every step costs one more read per step."""
    counts = [_host_reads_of_a_run(tmp_path, synth_root, iters, log_every=1)["tolist"] for iters in (2, 4)]
    assert counts[1] - counts[0] == 2


# --- the skip, on the device ---------------------------------------------------------------------------


class TinySeg(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, classes, 3, padding=1)

    def forward(self, x):
        return self.conv(x), None


def _engine(accum: int, optim: str = "sgd"):
    from anncli.train.engine import DDPEngine
    from anncli.train.losses import SegLoss

    torch.manual_seed(0)
    recipe = Recipe(name="t", train={"accum_steps": accum, "batch_size": 2},
                    optim={"name": optim, "lr": 0.1, "weight_decay": 0.01, "warmup_iters": 0})
    model = TinySeg()
    engine = DDPEngine(model, recipe, DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu")))
    return engine, SegLoss(LossConfig(ohem=False, aux_weight=0.0), 3)


def _batch(seed: int, poisoned: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 8, 8, generator=g)
    if poisoned:
        x[0, :, 2, 2] = float("inf")  # an overflowed activation: inf logits, a NaN loss
    return x, torch.randint(0, 3, (2, 8, 8), generator=g)


def _state(engine) -> list[torch.Tensor]:
    tensors = [p.detach().clone() for p in engine.module.parameters()]
    return tensors + [v.clone() for s in engine.optimizer.state.values() for v in s.values()]


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_a_non_finite_micro_batch_skips_its_whole_step(optim):
    """[good, poisoned] with 2 accumulation steps: the step is skipped whole (GradScaler's policy), and the
    next step is the one an engine that never saw the poisoned step takes."""
    skipping, criterion = _engine(accum=2, optim=optim)
    skipping.micro_step(*_batch(1), criterion, boundary=False)
    skipping.optimizer_step()  # a first step: optimizer state exists
    before = _state(skipping)
    stats, kept = skipping.micro_step(*_batch(2), criterion, boundary=False)
    assert bool(kept) and torch.isfinite(stats).all()
    stats, kept = skipping.micro_step(*_batch(3, poisoned=True), criterion, boundary=True)
    assert not bool(kept) and not torch.isfinite(stats).all()
    assert not bool(skipping.optimizer_step())
    assert all(torch.equal(a, b) for a, b in zip(before, _state(skipping)))

    reference, _ = _engine(accum=2, optim=optim)
    reference.micro_step(*_batch(1), criterion, boundary=False)
    reference.optimizer_step()
    for engine in (skipping, reference):
        engine.micro_step(*_batch(4), criterion, boundary=False)
        assert bool(engine.optimizer_step())
    for a, b in zip(_state(skipping), _state(reference)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_a_non_finite_gradient_from_a_finite_loss_is_skipped_like_a_non_finite_loss(optim):
    engine, criterion = _engine(accum=1, optim=optim)
    engine.micro_step(*_batch(1), criterion, boundary=True)
    engine.optimizer_step()
    before = _state(engine)
    hook = engine.module.conv.bias.register_hook(lambda g: g * float("nan"))  # one poisoned gradient
    stats, finite = engine.micro_step(*_batch(2), criterion, boundary=True)
    hook.remove()
    assert bool(finite) and torch.isfinite(stats).all()  # the loss itself is fine
    assert not bool(engine.optimizer_step())
    after = _state(engine)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(p.grad is None for p in engine.module.parameters())  # nothing carried into the next step


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_a_skipped_first_step_leaves_the_next_step_as_a_first_step(optim):
    """Fused SGD's first step creates its momentum buffers uninitialised; skipped, garbage would reach the
    weights at the next step. The next step after a skipped first one equals a fresh engine's first step."""
    skipped, criterion = _engine(accum=1, optim=optim)
    skipped.micro_step(*_batch(1, poisoned=True), criterion, boundary=True)
    assert not bool(skipped.optimizer_step())
    fresh, _ = _engine(accum=1, optim=optim)
    for engine in (skipped, fresh):
        engine.micro_step(*_batch(2), criterion, boundary=True)
        assert bool(engine.optimizer_step())
    for a, b in zip(_state(skipped), _state(fresh)):
        assert torch.equal(a, b)
    assert all(torch.isfinite(t).all() for t in _state(skipped))


@pytest.mark.parametrize("optim", ["sgd", "adamw"])
def test_a_step_without_a_kept_micro_batch_changes_no_weight_and_no_optimizer_state(optim):
    engine, criterion = _engine(accum=1, optim=optim)
    engine.micro_step(*_batch(1), criterion, boundary=True)
    engine.optimizer_step()  # momentum / Adam moments exist now: weight decay and momentum would move weights
    before = _state(engine)
    engine.micro_step(*_batch(2, poisoned=True), criterion, boundary=True)
    engine.optimizer_step()
    after = _state(engine)
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    assert all(torch.isfinite(p).all() for p in engine.module.parameters())

    fresh, _ = _engine(accum=1, optim=optim)  # a first step skipped: weights as built, state as new
    built = copy.deepcopy(fresh.module.state_dict())
    fresh.micro_step(*_batch(2, poisoned=True), criterion, boundary=True)
    fresh.optimizer_step()
    assert all(torch.equal(v, built[k]) for k, v in fresh.module.state_dict().items())
    moments = [v for s in fresh.optimizer.state.values() for k, v in s.items() if k != "step"]
    assert moments and all(not v.any() for v in moments)


# --- CUDA ------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("precision,ohem", [("fp32", False), ("bf16", False), ("bf16", True)])
def test_cuda_steps_between_log_steps_never_synchronise(tmp_path, synth_root, precision, ohem):
    """OHEM (the Cityscapes recipes' loss) selects its pixels with masks, never with sizes read back."""
    from anncli.train.step import train_step as _train_step

    run = _set_up_run(tmp_path, synth_root, torch.device("cuda", 0),
                      **{"train.iters": 8, "train.log_every": 1000, "train.precision": precision,
                         "loss.ohem": str(ohem).lower(), "loss.ohem_min_kept": 500})
    try:
        _train_step(run, 0)  # the first step allocates, autotunes and loads the data workers' first batches
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            results = [_train_step(run, step) for step in range(1, 5)]
        finally:
            torch.cuda.set_sync_debug_mode("default")
        rows = torch.stack([r.row() for r in results]).tolist()  # the log step's one read
        assert all(row[0] == 1.0 for row in rows)  # every step applied
    finally:
        run.close()
