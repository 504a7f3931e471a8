"""Recipe files: strict YAML (a key given twice is an error), `--set a.b=c` overrides, and the one-line
`RecipeError` that names the file and the dotted key of a problem."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import ValidationError

from anncli.errors import UserError


class RecipeError(UserError):
    """A recipe that cannot be used; the message is one line for the user."""


def set_dotted(tree: dict, dotted: str, value, source: str) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"{source}: --set {dotted}: '{part}' is not a section")
        node = child
    if isinstance(node.get(parts[-1]), dict) and isinstance(value, dict):
        first = next(iter(value), "KEY")
        raise RecipeError(f"{source}: --set {dotted}=…: would replace the whole section, resetting the keys it "
                          f"leaves out; set keys one by one (--set {dotted}.{first}=…)")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, object]:
    """`train.iters=100` → ("train.iters", 100); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise RecipeError(f"--set {text!r}: expected KEY=VALUE with a dotted key, e.g. train.iters=100")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return key, value


def format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    key = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown key"
    elif first["type"] == "missing":
        msg = "required key is missing"
    elif first["type"] == "value_error":  # our validators say "key: why"; the key joins the dotted path
        msg = msg.removeprefix("Value error, ")
        named = re.match(r"^([a-z_]+): (.*)$", msg)
        if named:
            key, msg = f"{key}.{named.group(1)}" if key != "(top level)" else named.group(1), named.group(2)
    given = first.get("input")
    detail = "" if first["type"] in ("extra_forbidden", "missing") or isinstance(given, dict) else f" (got {given!r})"
    more = f" [+{len(err.errors()) - 1} more]" if len(err.errors()) > 1 else ""
    return f"{source}: {key}: {msg}{detail}{more}"


class _DuplicateKey(yaml.YAMLError):
    def __init__(self, key, mark):
        super().__init__(f"duplicate key {key!r}")
        self.key, self.problem_mark = key, mark


class _StrictLoader(yaml.SafeLoader):
    """safe_load that refuses a key given twice in one mapping (YAML would silently keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise _DuplicateKey(key, key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_tree(p: Path, source: str):
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{source}: not UTF-8 text (byte {e.start}); save the recipe as UTF-8") from None
    except OSError as e:
        raise RecipeError(f"{source}: cannot read: {e.strerror}") from None
    try:
        tree = yaml.load(text, Loader=_StrictLoader)
    except _DuplicateKey as e:
        raise RecipeError(f"{source}: key {e.key!r} given twice (line {e.problem_mark.line + 1})") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise RecipeError(f"{source}: not valid YAML{where}") from None
    if tree is None:
        raise RecipeError(f"{source}: the recipe is empty; it needs at least the sections it changes")
    return tree
