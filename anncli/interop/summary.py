"""`ann model summary`: parameters per module and FLOPs for one input, like mmseg's get_flops tool.

The network is built on the meta device, so counting a ResNet-101 at 769x769 needs no memory and
takes no compute (`anncli.interop.flops`: eval mode, no_grad, batch 1).
"""

from __future__ import annotations

import json

import torch
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table
from torch import nn

from anncli.errors import UserError
from anncli.interop.flops import count_forward_flops
from anncli.models.ann import build_model
from anncli.recipe import ModelConfig
from anncli.data.sizes import parse_hw

# child attribute -> name shown and written to JSON
MODULES = {"backbone": "backbone", "afnb": "afnb", "context": "context", "apnb": "apnb",
           "classifier": "classifier", "aux_head": "aux"}


def count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def module_params(model: nn.Module) -> dict[str, int]:
    return {shown: count_params(getattr(model, attr)) for attr, shown in MODULES.items()
            if getattr(model, attr, None) is not None}


def summarize(model: str, backbone: str, classes: int, input_size: str | None, aux: bool,
              variant: str = "official") -> dict:
    size = parse_hw(input_size, "--input", "769x769") if input_size is not None else None
    try:
        cfg = ModelConfig(name=model, backbone=backbone, num_classes=classes, aux=aux, variant=variant)
    except ValidationError as e:
        first = e.errors()[0]
        if not first["loc"]:  # a check across options (mmseg has no fcn and no small backbone)
            raise UserError(f"--{first['msg'].removeprefix('Value error, ')}") from None
        option = {"name": "model", "num_classes": "classes"}.get(str(first["loc"][0]), first["loc"][0])
        raise UserError(f"--{option}: {first['msg']} (got {first.get('input')!r})") from None
    with torch.device("meta"):
        net = build_model(cfg)
    modules = module_params(net)
    return {"model": model, "variant": variant, "backbone": backbone, "classes": classes, "aux": aux,
            "input": None if size is None else f"{size[0]}x{size[1]}",
            "params": count_params(net), "modules": modules,
            "flops": None if size is None else count_forward_flops(net, torch.empty(1, 3, *size, device="meta"))}


def print_summary(model: str, backbone: str, classes: int, input_size: str | None, aux: bool, as_json: bool,
                  variant: str = "official") -> dict:
    result = summarize(model, backbone, classes, input_size, aux, variant)
    if as_json:
        print(json.dumps(result, indent=2))
        return result
    shown = model if variant == "official" else f"{model} ({variant})"
    table = Table(title=f"{shown} / {backbone}, {classes} classes{' + aux' if aux else ''}")
    table.add_column("module")
    table.add_column("params", justify="right")
    table.add_column("share", justify="right")
    for name, n in result["modules"].items():
        table.add_row(name, f"{n:,}", f"{100 * n / result['params']:.1f}%")
    table.add_row("total", f"{result['params']:,}", "100.0%", style="bold")
    console = Console()
    console.print(table)
    if result["flops"] is not None:
        console.print(f"FLOPs, input 1x3x{result['input']}, eval: {result['flops'] / 1e9:.1f} G "
                      f"({result['flops']:,}; a multiply-add counts 2)")
    return result
