"""One Engine interface, two engines: torch DistributedDataParallel and DeepSpeed.

The training loop only calls `set_lr`, `micro_step` and `optimizer_step`, the `Checkpointer` `save` and
`load`; everything that differs between the two (wrapping, mixed precision, gradient sync, checkpoint
files) lives here.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

import torch
from torch import nn

from anncli.checkpoint import save_torch
from anncli.integrity import load_torch
from anncli.distributed import DistInfo, all_reduce_sum_, barrier
from anncli.errors import UserError
from anncli.plan import lr_at, scaled_lr
from anncli.precision import AUTOCAST_DTYPES
from anncli.recipe import Recipe


def build_optimizer(params, recipe: Recipe, world_size: int) -> torch.optim.Optimizer:
    o = recipe.optim
    # The LR of step 0 of the schedule; the loop sets each step's LR with `set_lr` before the step.
    lr = lr_at(0, scaled_lr(recipe, world_size)[0], recipe)
    # The official recipe decays every parameter, BN and biases included.
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=o.momentum, weight_decay=o.weight_decay)
    return torch.optim.AdamW(params, lr=lr, betas=o.betas, weight_decay=o.weight_decay)


class _Engine:
    module: nn.Module
    optimizer: torch.optim.Optimizer

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _agree(self, total: torch.Tensor, parts: dict) -> tuple[torch.Tensor, bool]:
        """Mean loss values over ranks; finite only when every rank's loss is finite."""
        stats = torch.stack([total.detach().float(), parts["loss"].detach().float(), parts["aux_loss"].detach().float()])
        stats = all_reduce_sum_(stats) / self.info.world_size
        return stats, bool(torch.isfinite(stats).all())


class DDPEngine(_Engine):
    def __init__(self, model: nn.Module, recipe: Recipe, info: DistInfo):
        self.info = info
        self.module = model
        self.precision = recipe.train.precision
        self.grad_clip = recipe.optim.grad_clip
        self.accum_steps = recipe.train.accum_steps
        if info.distributed:
            device_ids = [info.device.index] if info.device.type == "cuda" else None
            self.model = nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
        else:
            self.model = model
        self.optimizer = build_optimizer(model.parameters(), recipe, info.world_size)
        self.scaler = torch.amp.GradScaler(info.device.type) if self.precision == "fp16" else None

    def _autocast(self):
        dtype = AUTOCAST_DTYPES.get(self.precision)
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.info.device.type, dtype=dtype)

    def micro_step(self, images, labels, criterion, boundary: bool) -> tuple[torch.Tensor, bool]:
        no_sync = self.info.distributed and not boundary
        with self.model.no_sync() if no_sync else contextlib.nullcontext():
            with self._autocast():
                main, aux = self.model(images)
            total, parts = criterion(main, aux, labels)
            stats, finite = self._agree(total, parts)
            if finite:
                loss = total / self.accum_steps
                (self.scaler.scale(loss) if self.scaler else loss).backward()
        return stats, finite

    def optimizer_step(self) -> None:
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


def deepspeed_config(recipe: Recipe) -> dict:
    t = recipe.train
    cfg = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.accum_steps,
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


class DeepSpeedEngine(_Engine):
    TAG = "deepspeed"

    def __init__(self, model: nn.Module, recipe: Recipe, info: DistInfo):
        if info.device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        _single_process_env()
        deepspeed.init_distributed(dist_backend="nccl" if info.device.type == "cuda" else "gloo")
        self.info = info
        self.module = model
        optimizer = build_optimizer(model.parameters(), recipe, info.world_size)
        self.model, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(recipe)
        )

    def micro_step(self, images, labels, criterion, boundary: bool) -> tuple[torch.Tensor, bool]:
        main, aux = self.model(images)
        total, parts = criterion(main, aux, labels)
        stats, finite = self._agree(total, parts)
        if finite:
            self.model.backward(total)
            self.model.step()
        return stats, finite

    def optimizer_step(self) -> None:
        pass  # `engine.step()` in micro_step steps the optimizer at the accumulation boundary

    def _grad_scaler(self):
        return getattr(self.model, "torch_autocast_z0_gradscaler", None) or getattr(
            self.model.optimizer, "torch_autocast_gradscaler", None
        )

    def save(self, directory: Path) -> None:
        self.model.save_checkpoint(str(directory), tag=self.TAG, save_latest=False)
        if self.info.is_main:
            save_torch(self.module.state_dict(), directory / "model.pt")
            scaler = self._grad_scaler()
            save_torch({"deepspeed_tag": self.TAG, "scaler": scaler.state_dict() if scaler else None},
                       directory / "optim.pt")
        barrier()

    def load(self, directory: Path) -> None:
        if not (directory / self.TAG).is_dir():
            raise UserError(f"checkpoint {directory}: has no DeepSpeed state (saved by the ddp engine?)")
        path, _ = self.model.load_checkpoint(str(directory), tag=self.TAG, load_optimizer_states=True,
                                             load_lr_scheduler_states=False)
        if path is None:
            raise UserError(f"checkpoint {directory}: DeepSpeed could not load its state")
        state = torch.load(directory / "optim.pt", map_location="cpu", weights_only=True)
        scaler = self._grad_scaler()
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])

    def scale(self) -> float | None:
        scaler = self._grad_scaler()
        return scaler.get_scale() if scaler else None


def build_engine(model: nn.Module, recipe: Recipe, info: DistInfo):
    return (DeepSpeedEngine if recipe.engine == "deepspeed" else DDPEngine)(model, recipe, info)
