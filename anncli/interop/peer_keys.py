"""Key names of the peers' checkpoints: which tool saved a state dict, and its names -> this package's.

- `detect`: the format of a loaded state dict (official, mmseg, or an ImageNet backbone of either);
- `to_ann`: peer key names -> this package's names (shared query/key aliases checked and dropped);
- `peer_params`: the parameters a peer file holds, counted as the peers count them.
"""

from __future__ import annotations

import re

import torch

from anncli.errors import UserError

FORMATS = ("official", "mmseg")
# (peer prefix, ann prefix); None = a second name of a shared projection, checked equal and dropped.
_ATT = [("f_key.0.", "f_key.0."), ("f_key.1.0.", "f_key.1."), ("f_query.0.", "f_query.0."),
        ("f_query.1.0.", "f_query.1."), ("f_value.", "f_value."), ("W.", "W.")]
OFFICIAL = [("backbone.", "backbone."), *[("fusion.stages.0." + a, "afnb.attention." + b) for a, b in _ATT],
            ("fusion.conv_bn_dropout.0.", "afnb.fuse.0."), ("fusion.conv_bn_dropout.1.", "afnb.fuse.1."),
            ("context.0.", "context.0."), ("context.1.0.", "context.1."), ("context.2.stages.0.f_query.", None),
            *[("context.2.stages.0." + a, "apnb.attention." + b) for a, b in _ATT if "query" not in a],
            ("context.2.conv_bn_dropout.0.", "apnb.fuse.0."), ("context.2.conv_bn_dropout.1.0.", "apnb.fuse.1."),
            ("cls.", "classifier."), ("dsn.0.", "aux_head.0.0."), ("dsn.1.0.", "aux_head.0.1."),
            ("dsn.3.", "aux_head.2.")]
_PROJ = [("key_project.conv.", "f_key.0."), ("key_project.bn.", "f_key.1."), ("query_project.conv.", "f_query.0."),
         ("query_project.bn.", "f_query.1."), ("value_project.", "f_value."), ("out_project.", "W.")]
MMSEG = [("backbone.", "backbone."), *[("decode_head.fusion.stages.0." + a, "afnb.attention." + b) for a, b in _PROJ],
         ("decode_head.fusion.bottleneck.conv.", "afnb.fuse.0."), ("decode_head.fusion.bottleneck.bn.", "afnb.fuse.1."),
         ("decode_head.bottleneck.conv.", "context.1."), ("decode_head.bottleneck.bn.", "context.2."),
         ("decode_head.context.stages.0.query_project.", None),
         *[("decode_head.context.stages.0." + a, "apnb.attention." + b) for a, b in _PROJ if "query" not in a],
         ("decode_head.context.bottleneck.conv.", "apnb.fuse.0."), ("decode_head.context.bottleneck.bn.", "apnb.fuse.1."),
         ("decode_head.conv_seg.", "classifier.1."), ("auxiliary_head.convs.0.conv.", "aux_head.0.0."),
         ("auxiliary_head.convs.0.bn.", "aux_head.0.1."), ("auxiliary_head.conv_seg.", "aux_head.2.")]
RULES = {"official": OFFICIAL, "mmseg": MMSEG}
CLASSIFIER = {"official": "cls.weight", "mmseg": "decode_head.conv_seg.weight"}
AUX = {"official": "dsn.", "mmseg": "auxiliary_head."}
IGNORED = ("data_preprocessor.",)  # mmseg 1.x normalisation buffers: the recipe holds mean/std
DEPTHS = {6: "resnet50", 23: "resnet101"}


def short_list(names: list[str], limit: int = 3) -> str:
    return ", ".join(names[:limit]) + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def detect(state: dict[str, torch.Tensor]) -> str:
    """official | mmseg | official-backbone | mmseg-backbone, or a UserError."""
    if any(k.startswith("decode_head.") for k in state):
        return "mmseg"
    if any(k.startswith(("fusion.stages.", "cls.", "dsn.")) for k in state):
        return "official"
    if "stem.0.weight" in state or "backbone.stem.0.weight" in state:
        return "mmseg-backbone"
    if any(k.endswith("conv1.weight") and k.count(".") <= 2 and "layer" not in k for k in state):
        return "official-backbone"
    raise UserError(f"unknown checkpoint layout (first keys: {short_list(sorted(state))})")


def depth_of(state: dict[str, torch.Tensor], prefix: str = "backbone.") -> str:
    blocks = {int(m.group(1)) for k in state if (m := re.match(re.escape(prefix) + r"layer3\.(\d+)\.", k))}
    if len(blocks) not in DEPTHS:
        raise UserError(f"backbone with {len(blocks)} blocks in layer3: expected 6 (ResNet-50) or 23 (ResNet-101)")
    return DEPTHS[len(blocks)]


def _rename(name: str, rules) -> tuple[bool, str | None]:
    for peer, ours in rules:
        if name.startswith(peer):
            return True, None if ours is None else ours + name[len(peer):]
    return False, None


def to_ann(state: dict[str, torch.Tensor], fmt: str) -> dict[str, torch.Tensor]:
    """Peer names -> ann names; an unmapped key or a shared projection that differs is a UserError."""
    rules = RULES[fmt]
    out, unmapped, aliases = {}, [], {}
    for name, value in state.items():
        known, ours = _rename(name, rules)
        if not known:
            unmapped.append(name)
        elif ours is None:
            aliases[name] = value
        else:
            out[ours] = value
    if unmapped:
        raise UserError(f"{fmt} checkpoint: unmapped keys: {short_list(unmapped)}")
    shared = "f_query" if fmt == "official" else "query_project"
    for name, value in aliases.items():
        twin = name.replace(shared, "f_key" if fmt == "official" else "key_project")
        known, ours = _rename(twin, rules)
        if ours not in out or out[ours].shape != value.shape or not torch.equal(out[ours], value):
            raise UserError(f"{fmt} checkpoint: {name} should equal the shared projection {twin}")
    return out


def peer_params(state: dict[str, torch.Tensor], fmt: str) -> int:
    """Parameters of a peer file: no BN statistics, no second names of shared projections, no fc."""
    stats = ("running_mean", "running_var", "num_batches_tracked")
    aliases = {"official": "context.2.stages.0.f_query.", "mmseg": "decode_head.context.stages.0.query_project."}
    skip = aliases.get(fmt)
    return sum(v.numel() for k, v in state.items()
               if not k.endswith(stats) and not (skip and k.startswith(skip)) and not k.startswith("fc."))
