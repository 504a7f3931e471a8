"""One Engine interface, two engines: torch DistributedDataParallel and DeepSpeed.

The training loop only calls `set_lr`, `micro_step` and `optimizer_step`, the `Checkpointer` `save` and
`load`; everything that differs between the two (wrapping, mixed precision, gradient sync, checkpoint
files) lives here.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
from pathlib import Path

import torch
from torch import nn

from anncli.runs.checkpoint import save_torch
from anncli.runs.integrity import load_torch
from anncli.cluster.distributed import DistInfo, all_reduce_sum_, barrier
from anncli.errors import UserError
from anncli.train.plan import lr_at, scaled_lr
from anncli.train.skip import FlatBuffers, SkippingAdamW, SkippingOptimizer, SkippingSGD, total_norm
from anncli.models.precision import AUTOCAST_DTYPES
from anncli.recipe import Recipe


def build_optimizer(params, recipe: Recipe, world_size: int, effective: int | None = None) -> torch.optim.Optimizer:
    """Torch's fused SGD or AdamW (one kernel per step, and a skip on the device: train.skip)."""
    o = recipe.optim
    # The LR of step 0 of the schedule; the loop sets each step's LR with `set_lr` before the step.
    lr = lr_at(0, scaled_lr(recipe, world_size, effective)[0], recipe)
    # The official recipe decays every parameter, BN and biases included.
    if o.name == "sgd":
        return SkippingSGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay, fused=True)
    return SkippingAdamW(params, lr=lr, betas=o.betas, weight_decay=o.weight_decay, fused=True)


def compile_backend(recipe: Recipe) -> str:
    """`model.compile_backend`, checked against the backends torch.compile knows."""
    backend = recipe.model.compile_backend
    if backend not in torch.compiler.list_backends(exclude_tags=()):
        raise UserError(f"model.compile_backend {backend!r}: not a torch.compile backend (one of: "
                        f"{', '.join(torch.compiler.list_backends())})")
    return backend


class _Engine:
    module: nn.Module  # the network itself (never a DDP or compile wrapper): what checkpoints save
    optimizer: torch.optim.Optimizer
    guard: SkippingOptimizer  # the torch optimizer that takes the skip flag
    buffers: FlatBuffers
    step_check: torch.Tensor | None = None  # non-finite when a micro-batch of this step was, on some rank

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _check_forward(self, total: torch.Tensor, parts: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean loss values over ranks, finite): `finite` is true when every rank's losses and batch-norm
        statistics after this forward are finite. One all-reduce; both stay on the device (no host read).

        The statistics enter as their sum, which is non-finite exactly when one of them is (no running
        statistic comes near float32's 3e38), and the step's check adds up every micro-batch's values."""
        with torch.no_grad():
            stats = torch.stack([total, parts["loss"], parts["aux_loss"], self.buffers.total()])
            all_reduce_sum_(stats)
            check = stats.sum()
            self.step_check = check if self.step_check is None else self.step_check + check
            losses = stats[:3] / self.info.world_size if self.info.world_size > 1 else stats[:3]
            return losses, torch.isfinite(check)

    def _skip_unless_finite(self, norm: torch.Tensor | None = None) -> torch.Tensor:
        """The skip flag of this step: its micro-batches' checks and the gradients' norm, non-finite."""
        check = self.step_check if norm is None else self.step_check + norm
        self.step_check = None
        return ~torch.isfinite(check)

    def _applied(self) -> torch.Tensor:
        """After a step: whether it changed the weights (a device bool)."""
        return self.guard.skipped == 0


class DDPEngine(_Engine):
    """`split` (plan.Split): how this world splits a step's batch; the recipe's split when None."""

    def __init__(self, model: nn.Module, recipe: Recipe, info: DistInfo, split=None):
        self.info = info
        self.module = model
        self.precision = recipe.train.precision
        self.grad_clip = recipe.optim.grad_clip
        self.accum_steps = split.accum_steps if split else recipe.train.accum_steps
        self.buffers = FlatBuffers(model)  # before DDP, which keeps the buffers it broadcasts
        if info.distributed:
            device_ids = [info.device.index] if info.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        else:
            self.model = model
        if recipe.model.compile:  # compile around DDP: dynamo splits the graph at DDP's gradient buckets
            self.model = torch.compile(self.model, backend=compile_backend(recipe))
        self.optimizer = build_optimizer(model.parameters(), recipe, info.world_size, split and split.effective_batch)
        self.guard = self.optimizer
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.scaler = torch.amp.GradScaler(info.device.type) if self.precision == "fp16" else None

    def _autocast(self):
        dtype = AUTOCAST_DTYPES.get(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=dtype)

    def micro_step(self, images, labels, criterion, boundary: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean losses over ranks, finite): device tensors. A non-finite micro-batch keeps no batch-norm
        statistics, and its optimizer step is skipped."""
        no_sync = self.info.distributed and not boundary
        self.buffers.snapshot()
        with self.model.no_sync() if no_sync else contextlib.nullcontext():
            with self._autocast():
                main, aux = self.model(images)
            total, parts = criterion(main, aux, labels)
            stats, finite = self._check_forward(total, parts)
            loss = total / self.accum_steps if self.accum_steps > 1 else total
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        self.buffers.restore_unless(finite)  # after the backward, which may still read them
        return stats, finite

    def optimizer_step(self) -> torch.Tensor:
        """Clip, step and zero the gradients; returns whether the step was applied (a device bool). One fused
        norm checks the gradients (DDP averaged them: every rank decides alike)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = total_norm([p.grad for p in self.params if p.grad is not None])
        if self.grad_clip:
            nn.utils.clip_grads_with_norm_(self.params, self.grad_clip, norm)
        self.optimizer.skip = self._skip_unless_finite(norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return self._applied()

    def save(self, directory: Path) -> None:
        if self.info.is_main:
            save_torch(self.module.state_dict(), directory / "model.pt")
            scaler = self.scaler.state_dict() if self.scaler else None
            save_torch({"optimizer": self.optimizer.state_dict(), "scaler": scaler}, directory / "optim.pt")

    def load(self, directory: Path) -> None:
        self.module.load_state_dict(load_torch(directory / "model.pt", map_location=self.info.device))
        state = load_torch(directory / "optim.pt", map_location=self.info.device)
        if "optimizer" not in state:
            raise UserError(f"checkpoint {directory}: optim.pt holds no DDP optimizer state (saved by another engine?)")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])

    def scale(self) -> float | None:
        return self.scaler.get_scale() if self.scaler else None


def deepspeed_config(recipe: Recipe, split=None) -> dict:
    t = recipe.train
    cfg = {
        "train_micro_batch_size_per_gpu": split.batch_size if split else t.batch_size,
        "gradient_accumulation_steps": split.accum_steps if split else t.accum_steps,
        "zero_optimization": {"stage": recipe.deepspeed.zero_stage},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if recipe.optim.grad_clip:
        cfg["gradient_clipping"] = recipe.optim.grad_clip
    if t.precision in AUTOCAST_DTYPES:
        # DeepSpeed's own bf16/fp16 modes cast parameters but not BatchNorm buffers, and BN then fails
        # on mixed dtypes. torch autocast keeps parameters and BN statistics in fp32 and runs convs in
        # low precision, the same numerics as the DDP engine; DeepSpeed adds a GradScaler for fp16.
        cfg["torch_autocast"] = {"enabled": True, "dtype": "bfloat16" if t.precision == "bf16" else "float16"}
    return cfg


def _single_process_env() -> None:
    """DeepSpeed always wants a process group; give a lone process a private one."""
    if "WORLD_SIZE" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")


def announce_shm_build() -> bool:
    """One line before DeepSpeed's silent first-run compile of its CPU op (about a minute on 2 cores)."""
    from glob import glob

    from deepspeed.git_version_info import installed_ops
    from torch.utils.cpp_extension import _get_build_directory

    if installed_ops.get("deepspeed_shm_comm"):
        return False
    where = _get_build_directory("deepspeed_shm_comm", verbose=False)
    if glob(os.path.join(where, "*.so")):
        return False
    print(f"[ann] building DeepSpeed's CPU communication op (deepspeed_shm_comm) in {where}: about a minute, "
          "once per machine and torch version (TORCH_EXTENSIONS_DIR)", file=sys.stderr, flush=True)
    return True


class DeepSpeedEngine(_Engine):
    """Checkpoints hold one world-free file, `zero.pt` (anncli.runs.zero_state): the ZeRO partitions gathered into
    full fp32 weights and optimizer states, loadable by any world size with `torch.load(weights_only=True)`."""

    STATE = "zero.pt"

    def __init__(self, model: nn.Module, recipe: Recipe, info: DistInfo, split=None):
        if info.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        _single_process_env()
        if info.device.type == "cpu" and info.local_rank == 0:
            announce_shm_build()
        deepspeed.init_distributed(dist_backend="nccl" if info.device.type == "cuda" else "gloo")
        self.info = info
        self.module = model
        self.buffers = FlatBuffers(model)
        optimizer = build_optimizer(model.parameters(), recipe, info.world_size, split and split.effective_batch)
        optimizer.check_gradients = True  # ZeRO hands it this rank's partition of the reduced gradients
        self.guard = optimizer  # ZeRO's partitions are its parameters once initialised
        self._not_stepped = torch.ones((), device=info.device)
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(recipe, split)
        )
        if recipe.model.compile:
            self.model.compile(backend=compile_backend(recipe))

    def micro_step(self, images, labels, criterion, boundary: bool) -> tuple[torch.Tensor, torch.Tensor]:
        self.buffers.snapshot()
        main, aux = self.model(images)
        total, parts = criterion(main, aux, labels)
        stats, finite = self._check_forward(total, parts)
        self.model.backward(total)
        if not boundary:
            self.model.step()  # DeepSpeed counts every micro-batch; it updates at the boundary (optimizer_step)
        self.buffers.restore_unless(finite)  # after the backward, which may still read them
        return stats, finite

    def optimizer_step(self) -> torch.Tensor:
        """DeepSpeed's boundary step: reduce, clip, update (skipped on the device when non-finite)."""
        self.guard.skip = self._skip_unless_finite()
        self.guard.skipped = self._not_stepped  # ZeRO skips an overflowed step itself, without calling the optimizer
        self.model.step()
        return self._applied()

    def _grad_scaler(self):
        return getattr(self.model, "torch_autocast_z0_gradscaler", None) or getattr(
            self.model.optimizer, "torch_autocast_gradscaler", None
        )

    def save(self, directory: Path) -> None:
        from anncli.runs.zero_state import gather_full_state

        state = gather_full_state(self.model, self._grad_scaler())  # collective; the dict on rank 0
        if self.info.is_main:
            save_torch(state, directory / self.STATE)
            save_torch(self.module.state_dict(), directory / "model.pt")
        barrier()

    def load(self, directory: Path) -> None:
        from anncli.runs.zero_state import ZeroStateError, load_full_state, read_full_state

        if not (directory / self.STATE).is_file():
            raise UserError(f"checkpoint {directory}: has no DeepSpeed state {self.STATE} (saved by the ddp engine?)")
        try:
            load_full_state(self.model, read_full_state(directory / self.STATE), self._grad_scaler())
        except ZeroStateError as e:
            raise UserError(f"checkpoint {directory}: {e}") from None

    def scale(self) -> float | None:
        scaler = self._grad_scaler()
        return scaler.get_scale() if scaler else None


def build_engine(model: nn.Module, recipe: Recipe, info: DistInfo, split=None):
    return (DeepSpeedEngine if recipe.engine == "deepspeed" else DDPEngine)(model, recipe, info, split)
