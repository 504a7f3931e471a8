"""Image and feature-map sizes written on the command line as HxW (height x width)."""

from __future__ import annotations

import re

from anncli.errors import UserError

_HXW = re.compile(r"\s*(\d+)\s*[xX]\s*(\d+)\s*")


def parse_hw(text: str, option: str, example: str = "864x864") -> tuple[int, int]:
    """`769x769` → (769, 769): height x width, both positive integers; anything else is a UserError that
    names the option, e.g. "--crop '16by16': expected HxW with positive integers, e.g. 864x864"."""
    m = _HXW.fullmatch(text or "")
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise UserError(f"{option} {text!r}: expected HxW with positive integers, e.g. {example}")
    return int(m.group(1)), int(m.group(2))
