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
from anncli.train.skip import NonFiniteSkip
from anncli.precision import AUTOCAST_DTYPES
from anncli.recipe import Recipe


def build_optimizer(params, recipe: Recipe, world_size: int, effective: int | None = None) -> torch.optim.Optimizer:
    o = recipe.optim
    # The LR of step 0 of the schedule; the loop sets each step's LR with `set_lr` before the step.
    lr = lr_at(0, scaled_lr(recipe, world_size, effective)[0], recipe)
    # The official recipe decays every parameter, BN and biases included.
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=o.betas, weight_decay=o.weight_decay)


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

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _agree(self, total: torch.Tensor, parts: dict, saved: list) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss values over ranks, and the loss to back-propagate: 0 unless every rank's loss and buffers
        (batch-norm statistics after this forward) are finite. One all-reduce; both stay on the device (no host
        read); `self.skip.finite` says whether the micro-batch counts."""
        bad_buffers = (~buffers_finite(saved)).float().to(total.device)
        stats = torch.stack([total.detach().float(), parts["loss"].detach().float(), parts["aux_loss"].detach().float(),
                             bad_buffers])
        stats = all_reduce_sum_(stats) / self.info.world_size
        ok = torch.isfinite(stats[:3]).all() & (stats[3] == 0)
        return stats[:3], self.skip.decide(ok, total)


def snapshot_buffers(module: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(buffer, copy) of every buffer (batch-norm running statistics, num_batches_tracked) before a forward."""
    return [(b, b.detach().clone()) for b in module.buffers()]


def buffers_finite(saved: list) -> torch.Tensor:
    flags = [torch.isfinite(b).all() for b, _ in saved if b.is_floating_point()]
    return torch.stack(flags).all() if flags else torch.tensor(True)


def settle_buffers(saved: list, keep: torch.Tensor) -> None:
    """A skipped micro-batch leaves no trace: unless `keep` (a bool tensor agreed by every rank), every buffer
    gets back its value from before the forward, on every rank alike (sync-BN spread the statistics to all of
    them; DDP broadcasts rank 0's at the next forward). torch.where: no host sync."""
    with torch.no_grad():
        for buf, old in saved:
            buf.copy_(torch.where(keep.to(buf.device), buf, old))


class DDPEngine(_Engine):
    """`split` (plan.Split): how this world splits a step's batch; the recipe's split when None."""

    def __init__(self, model: nn.Module, recipe: Recipe, info: DistInfo, split=None):
        self.info = info
        self.module = model
        self.precision = recipe.train.precision
        self.grad_clip = recipe.optim.grad_clip
        self.accum_steps = split.accum_steps if split else recipe.train.accum_steps
        if info.distributed:
            device_ids = [info.device.index] if info.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        else:
            self.model = model
        if recipe.model.compile:  # compile around DDP: dynamo splits the graph at DDP's gradient buckets
            self.model = torch.compile(self.model, backend=compile_backend(recipe))
        self.optimizer = build_optimizer(model.parameters(), recipe, info.world_size, split and split.effective_batch)
        self.scaler = torch.amp.GradScaler(info.device.type) if self.precision == "fp16" else None
        self.skip = NonFiniteSkip(model, info.device)

    def _autocast(self):
        dtype = AUTOCAST_DTYPES.get(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=dtype)

    def micro_step(self, images, labels, criterion, boundary: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean losses over ranks, kept): device tensors; a non-finite micro-batch adds nothing."""
        no_sync = self.info.distributed and not boundary
        saved = snapshot_buffers(self.module)
        with self.model.no_sync() if no_sync else contextlib.nullcontext():
            with self._autocast():
                main, aux = self.model(images)
            total, parts = criterion(main, aux, labels)
            stats, kept_total = self._agree(total, parts, saved)
            loss = kept_total / self.accum_steps
            (self.scaler.scale(loss) if self.scaler else loss).backward()
        settle_buffers(saved, self.skip.finite)  # after the backward, which may still read them
        return stats, self.skip.finite

    def optimizer_step(self) -> None:
        self.skip.optimizer_step(self._optimizer_step, list(self.module.parameters()), self.optimizer)

    def _optimizer_step(self) -> None:
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip:
            nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

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
        optimizer = build_optimizer(model.parameters(), recipe, info.world_size, split and split.effective_batch)
        self.skip = NonFiniteSkip(model, info.device)
        self._torch_optimizer = optimizer  # ZeRO's partitions are its parameters once initialised
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(recipe, split)
        )
        if recipe.model.compile:
            self.model.compile(backend=compile_backend(recipe))

    def micro_step(self, images, labels, criterion, boundary: bool) -> tuple[torch.Tensor, torch.Tensor]:
        saved = snapshot_buffers(self.module)
        main, aux = self.model(images)
        total, parts = criterion(main, aux, labels)
        stats, kept_total = self._agree(total, parts, saved)
        self.model.backward(kept_total)
        if self.model.is_gradient_accumulation_boundary():
            self.skip.optimizer_step(self.model.step, list(self.module.parameters()), self._torch_optimizer)
        else:
            self.model.step()
        settle_buffers(saved, self.skip.finite)  # after the backward, which may still read them
        return stats, self.skip.finite

    def optimizer_step(self) -> None:
        pass  # `engine.step()` in micro_step steps the optimizer at the accumulation boundary

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
