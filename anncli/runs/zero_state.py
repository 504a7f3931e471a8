"""World-size-free DeepSpeed training state: gather ZeRO-0/1/2 partitions into one plain dict, and load it
into a freshly built engine of any world size.

ZeRO-1/2 keep each rank's slice of the fp32 master weights and of the optimizer states in one flat tensor
per parameter group (`single_partition_of_fp32_groups[g]`); the base torch optimizer's state is keyed by
that flat slice. Every model parameter knows, through DeepSpeed's `_hp_mapping`, which piece of itself lives
in this rank's slice (`lp_fragment_address`) and where in the slice (`hp_fragment_address`). That is the
same bookkeeping DeepSpeed's `safe_get_full_fp32_param` / `safe_get_full_optimizer_state` use; we read
the fragments straight from the optimizer's live state instead of the links DeepSpeed makes after the first
step (those are made once, so they miss states created later, and they are absent on a fresh engine):

- gather: each rank writes its fragments into a zero buffer holding every trainable parameter end to end,
  and one all_reduce(SUM) per state assembles it (x + 0 is exact, so the result is bit-identical to the
  partitions). Scalar states (AdamW's `step`) are the same on every rank and are taken from rank 0.
- load: each rank copies the full fp32 weights into the module (ZeRO-1/2 replicate them) and its own
  fragments into the flat master slice and into freshly created optimizer states. No collective, and
  the file is opened with `mmap=True`, so a rank reads the weights and only its own 1/W of the states.

The dict holds only tensors, strings, numbers and dicts, so `torch.load(weights_only=True)` reads it, and
resume never calls DeepSpeed's `load_checkpoint` (which unpickles with weights_only=False).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

FORMAT = "ann-zero-full"
VERSION = 1


class ZeroStateError(ValueError):
    """A consolidated state that does not fit the engine it is loaded into."""


def _stage(engine) -> int:
    stage = int(engine.zero_optimization_stage())
    if stage not in (0, 1, 2):
        raise ZeroStateError(f"ZeRO stage {stage} is not supported (only 0, 1 and 2)")
    return stage


def _named_trainable(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def _groups(engine):
    """[(flat master slice, [lp params]) per group], base optimizer; stage 0 has no flat slices."""
    opt = engine.optimizer
    if _stage(engine) == 0:
        return None, opt
    return list(zip(opt.single_partition_of_fp32_groups, opt.bit16_groups)), opt.optimizer


def _fragments(groups):
    """(group index, lp param, lp start, hp start, numel) of every piece this rank owns."""
    for g, (_flat, params) in enumerate(groups):
        for p in params:
            m = getattr(p, "_hp_mapping", None)
            if m is not None:
                yield g, p, m.lp_fragment_address.start, m.hp_fragment_address.start, m.hp_fragment_address.numel


def _state_keys(base, flats) -> tuple[list[str], dict]:
    """Per-element state names (shaped like the flat slice) and scalar states (from the first group)."""
    st = base.state.get(flats[0], {}) if flats else {}
    keys = sorted(k for k, v in st.items() if torch.is_tensor(v) and v.shape == flats[0].shape)
    scalars = {k: (v.detach().clone().cpu() if torch.is_tensor(v) else v) for k, v in st.items() if k not in keys}
    return keys, scalars


def _assemble(named, groups, source) -> dict[str, torch.Tensor]:
    """Full tensors of every trainable parameter from this rank's fragments of `source(g)`, via all_reduce."""
    offsets, total = {}, 0
    for name, p in named:
        offsets[id(p)] = total
        total += p.numel()
    device = groups[0][0].device
    buf = torch.zeros(total, dtype=torch.float32, device=device)
    for g, p, lp_start, hp_start, n in _fragments(groups):
        at = offsets[id(p)] + lp_start
        buf[at:at + n].copy_(source(g).narrow(0, hp_start, n))
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(buf)
    return {name: buf[offsets[id(p)]:offsets[id(p)] + p.numel()].view_as(p).cpu().clone() for name, p in named}


@torch.no_grad()
def gather_full_state(engine, grad_scaler=None) -> dict | None:
    """Collective (every rank calls it): the unpartitioned fp32 weights, optimizer states, scaler state and
    step counters of a DeepSpeed ZeRO-0/1/2 engine; the dict on rank 0, None on the others."""
    module = engine.module
    named = _named_trainable(module)
    groups, base = _groups(engine)
    if groups is None:
        params = {n: p.detach().float().cpu().clone() for n, p in named}
        keys = sorted({k for _, p in named for k, v in base.state.get(p, {}).items()
                       if torch.is_tensor(v) and v.shape == p.shape})
        states = {k: {n: base.state[p][k].detach().float().cpu().clone() for n, p in named} for k in keys}
        first = base.state.get(named[0][1], {}) if named else {}
        scalars = {k: (v.detach().clone().cpu() if torch.is_tensor(v) else v) for k, v in first.items() if k not in keys}
    else:
        flats = [f for f, _ in groups]
        keys, scalars = _state_keys(base, flats)
        params = _assemble(named, groups, lambda g: flats[g])
        states = {k: _assemble(named, groups, lambda g, k=k: base.state[flats[g]][k]) for k in keys}
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    trainable = {n for n, _ in named}
    rest = {n: t.detach().cpu().clone() for n, t in module.state_dict().items() if n not in trainable}
    return {
        "format": FORMAT, "version": VERSION, "zero_stage": _stage(engine),
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "params": params, "rest": rest,
        "optimizer": {"name": type(base).__name__, "states": states, "scalars": scalars},
        "scaler": grad_scaler.state_dict() if grad_scaler is not None else None,
        "engine": {"global_steps": int(engine.global_steps), "global_samples": int(engine.global_samples),
                   "skipped_steps": int(engine.skipped_steps)},
    }


def read_full_state(path: str | Path) -> dict:
    """Open a saved state safely (weights_only) and lazily (mmap: pages are read only when touched)."""
    import pickle

    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ZeroStateError(f"{path}: cannot be read as a plain tensor file ({first})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ZeroStateError(f"{path}: not a consolidated DeepSpeed state ({FORMAT})")
    if state.get("version") != VERSION:
        raise ZeroStateError(f"{path}: consolidated state version {state.get('version')}, expected {VERSION}")
    return state


def _check(state: dict, named, base, module: nn.Module) -> None:
    names = {n for n, _ in named}
    rest = set(module.state_dict()) - names
    if set(state["rest"]) != rest:
        raise ZeroStateError(f"buffers differ from the model: saved {sorted(set(state['rest']) ^ rest)[:3]} mismatch")
    if set(state["params"]) != names:
        missing, extra = sorted(names - set(state["params"])), sorted(set(state["params"]) - names)
        raise ZeroStateError(f"parameters differ from the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for n, p in named:
        if tuple(state["params"][n].shape) != tuple(p.shape):
            raise ZeroStateError(f"parameter {n}: shape {tuple(state['params'][n].shape)}, model has {tuple(p.shape)}")
    if state["optimizer"]["name"] != type(base).__name__:
        raise ZeroStateError(f"optimizer {state['optimizer']['name']} saved, {type(base).__name__} built")


@torch.no_grad()
def load_full_state(engine, state: dict, grad_scaler=None) -> None:
    """Put a `gather_full_state` dict into a freshly built engine of any world size (every rank, no collective)."""
    module = engine.module
    named = _named_trainable(module)
    groups, base = _groups(engine)
    _check(state, named, base, module)
    for n, p in named:
        p.data.copy_(state["params"][n])
    module.load_state_dict(state["rest"], strict=False)  # keys checked above; parameters were copied
    opt_states, scalars = state["optimizer"]["states"], state["optimizer"]["scalars"]
    if groups is None:
        for n, p in named:
            st = base.state[p]
            st.update({k: v.clone() if torch.is_tensor(v) else v for k, v in scalars.items()})
            st.update({k: opt_states[k][n].to(p.device, p.dtype).clone() for k in opt_states})
    else:
        for flat, _ in groups:
            st = base.state[flat]
            st.update({k: v.clone() if torch.is_tensor(v) else v for k, v in scalars.items()})
            st.update({k: torch.zeros_like(flat) for k in opt_states})
        name_of = {id(p): n for n, p in named}
        for g, p, lp_start, hp_start, n in _fragments(groups):
            flat, name = groups[g][0], name_of[id(p)]
            flat.narrow(0, hp_start, n).copy_(state["params"][name].reshape(-1)[lp_start:lp_start + n])
            for k, full in opt_states.items():
                base.state[flat][k].narrow(0, hp_start, n).copy_(full[name].reshape(-1)[lp_start:lp_start + n])
        engine.optimizer._hp_optimizer_states_linked = False  # DeepSpeed re-links its views at the next step
    if grad_scaler is not None and state.get("scaler"):
        grad_scaler.load_state_dict(state["scaler"])
    counters = state["engine"]
    engine.global_steps = counters["global_steps"]
    engine.global_samples = counters["global_samples"]
    engine.skipped_steps = counters["skipped_steps"]

