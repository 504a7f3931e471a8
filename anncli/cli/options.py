"""The options several `ann` commands share, and how `ann … --help` reads.

Help names values with words (PATH, TEXT, N) and usage lines write arguments as RECIPE, not {recipe}:
Typer shows a value's Python type (`<path>`, `<list[str]>`, `<int range> [x>=1]`) and wraps required
arguments in braces; `App` gives every command of the `ann` app a command class that shows words
instead. An option that names its own metavar (`--crop HxW`) keeps it. Torch-free, like cli.py.
"""

from __future__ import annotations

import functools
import inspect
import types
import typing
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup

_WORDS = {Path: "PATH", str: "TEXT", int: "N", float: "NUMBER"}


def _value_type(annotation):
    """The type one value converts to: Optional[X], list[X] and Optional[list[X]] give X."""
    while typing.get_origin(annotation) in (typing.Union, types.UnionType, list):
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


def _word(annotation) -> str:
    """The metavar of an option without one of its own: PATH, TEXT, N, NUMBER (a list: its element's word)."""
    kind = _value_type(annotation)
    if isinstance(kind, type) and issubclass(kind, Path):
        return "PATH"
    return _WORDS.get(kind, "VALUE")


@functools.lru_cache(maxsize=None)
def _annotations(callback) -> dict:
    """The Python annotation of each parameter of a command's function, read from its signature (public
    API in every typer release, unlike the parameter objects' own type records)."""
    if callback is None:
        return {}
    try:
        parameters = inspect.signature(callback, eval_str=True).parameters.values()
    except (NameError, TypeError, ValueError):
        return {}
    return {p.name: typing.get_args(p.annotation)[0] if typing.get_origin(p.annotation) is Annotated else p.annotation
            for p in parameters if p.annotation is not inspect.Parameter.empty}


def _no_type(ctx) -> None:
    return None


def _tidy(params, callback) -> None:
    """Words for values, nothing for flags."""
    annotations = _annotations(callback)
    for param in params:
        if isinstance(param, TyperArgument):
            param.metavar = param.metavar or param.name.upper()
            param.display_type_rich = _no_type  # the row already starts with the argument's word
        elif getattr(param, "is_flag", False):
            param.metavar = ""  # a flag takes no value: show none (typer shows <bool>)
        elif param.metavar is None and param.name in annotations:
            param.metavar = _word(annotations[param.name])


class _Tidy:
    """What commands and groups share: every parameter they show, the help option included, is tidied."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        _tidy(params, self.callback)
        return params


class Command(_Tidy, TyperCommand):
    """A command whose help names values with words and whose usage line writes arguments as RECIPE."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if isinstance(param, TyperArgument):
                name = param.metavar if param.required else f"[{param.metavar}]"
                pieces.append(name + ("..." if param.nargs != 1 else ""))
        return pieces


class Group(_Tidy, TyperGroup):
    """A group (`ann`, `ann data`, …) whose own options read the same way."""


class App(typer.Typer):
    """typer.Typer whose commands are `Command`s and groups `Group`s, so that every help reads the same way."""

    def __init__(self, *args, cls=None, **kwargs):
        super().__init__(*args, cls=cls or Group, **kwargs)

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or Command, **kwargs)


def at_least(low: int):
    """An option callback that refuses values below `low` (kept out of the help, unlike typer's `min=`,
    whose `[x>=1]` each typer release shows differently)."""

    def check(value):
        if value is not None and value < low:
            raise typer.BadParameter(f"{value} is below the minimum {low}.")
        return value

    return check


RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML, e.g. recipes/cityscapes.yaml, or a built-in name (ann recipes list).")]


def set_option(example: str):
    """The repeatable --set option, with an example that fits the command."""
    return Annotated[Optional[list[str]], typer.Option("--set", metavar="KEY=VALUE",
                                                       help=f"Override a recipe key: --set {example} (repeatable).")]


SetOpt = set_option("train.iters=100")
# The prediction formats of `ann eval --pred-format` and `ann predict --format` (anncli/eval/formats.py).
PRED_FORMAT_HELP = ("train-ids: the trained class ids 0..K-1; cityscapes: Cityscapes labelIds (7..33), "
                    "<name>_labelIds.png, for the official evaluation and the test server; ade20k: 1..150 (0 = "
                    "other), <name>.png, for the ADE20K scene-parsing server.")
WorkDirOpt = Annotated[Optional[Path], typer.Option(help="Run directory (default runs/<recipe name>).")]


def _launch_option(name: str, default, kind, flags: tuple[str, ...], help: str, **limits) -> inspect.Parameter:
    annotation = Annotated[kind, typer.Option(*flags, help=help, **limits)]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


LAUNCH_OPTIONS = [
    _launch_option("nodes", None, Optional[int], ("--nodes",), "Number of nodes (default 1, or the SLURM "
                   "allocation's).", callback=at_least(1)),
    _launch_option("nproc_per_node", None, Optional[int], ("--nproc-per-node", "--gpus-per-node"),
                   "Processes per node (default: visible GPUs, or 1).", callback=at_least(1)),
    _launch_option("node_rank", None, Optional[int], ("--node-rank",), "This node's rank (default: from rendezvous).",
                   callback=at_least(0)),
    _launch_option("rdzv_endpoint", None, Optional[str], ("--rdzv-endpoint",), "HOST:PORT of the c10d rendezvous "
                   "(multi-node).", metavar="HOST:PORT"),
    _launch_option("max_restarts", 0, int, ("--max-restarts",), "Worker-group restarts torchrun may do.",
                   callback=at_least(0)),
]


def launched(verb: str):
    """Give a command the launch options (LAUNCH_OPTIONS); it receives them as one `launch` request."""

    def decorate(command):
        signature = inspect.signature(command, eval_str=True)
        own = [p for p in signature.parameters.values() if p.name != "launch"]

        @functools.wraps(command)
        def with_launch_options(**kwargs):
            from anncli.cluster.launch import request_for

            options = {p.name: kwargs.pop(p.name) for p in LAUNCH_OPTIONS}
            return command(**kwargs, launch=request_for(verb, **options))

        with_launch_options.__signature__ = signature.replace(parameters=own + LAUNCH_OPTIONS)
        with_launch_options.__annotations__ = {p.name: p.annotation for p in own + LAUNCH_OPTIONS}
        return with_launch_options

    return decorate
