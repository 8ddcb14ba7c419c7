"""`--help` for `python -m launch.train` (and `shardtune-train`): every flag with its default and its comment from
launch/config.py, one line per section, and the shipped recipes. It imports no torch, so it answers at once."""

from __future__ import annotations

import ast
import dataclasses
import typing
from pathlib import Path

from launch import config as config_module

ROOT = Path(__file__).resolve().parents[1]
USAGE = """usage: python -m launch.train --config RECIPE [--section.key VALUE ...]
       torchrun --nproc_per_node N -m launch.train --config RECIPE [--section.key VALUE ...]

Fine-tune a LLaMA-2-family model with FSDP2. Values: defaults < recipe YAML < these flags. A bad value or a typo'd
key is refused before anything starts, naming the flag (and the closest key)."""


def field_comments() -> dict[str, str]:
    """`Class.field` -> its comment in launch/config.py: the lines just above the field, or the one after it."""
    source = Path(config_module.__file__).read_text()
    lines = source.splitlines()
    comments = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not isinstance(item, ast.AnnAssign) or not isinstance(item.target, ast.Name):
                continue
            above, row = [], item.lineno - 2
            while row >= 0 and lines[row].strip().startswith("#"):
                above.insert(0, lines[row].strip().lstrip("# "))
                row -= 1
            inline = lines[item.lineno - 1].split("  # ", 1)
            text = " ".join(above + ([inline[1].strip()] if len(inline) > 1 else []))
            comments[f"{node.name}.{item.target.id}"] = text
    return comments


def type_name(kind) -> str:
    if typing.get_origin(kind) is typing.Union:
        return type_name(next(a for a in typing.get_args(kind) if a is not type(None))) + "?"
    if typing.get_origin(kind) is list:
        return f"[{type_name(typing.get_args(kind)[0])},...]"
    return getattr(kind, "__name__", str(kind))


def recipes() -> list[str]:
    out = []
    for recipe in sorted((ROOT / "recipes").glob("*.yaml")):
        first = recipe.read_text().splitlines()[0].lstrip("# ").strip() if recipe.stat().st_size else ""
        out.append(f"  {recipe.relative_to(ROOT)}  {first}")
    return out


def help_text() -> str:
    comments = field_comments()
    lines = [USAGE, "", "  --config RECIPE            a recipe (YAML); see the list below", ""]
    for section in dataclasses.fields(config_module.Config):
        cls = section.default_factory
        lines.append(f"{section.name}: {cls.__doc__}")
        hints = typing.get_type_hints(cls)
        for item in dataclasses.fields(cls):
            default = item.default if item.default is not dataclasses.MISSING else item.default_factory()
            flag = f"--{section.name}.{item.name} {type_name(hints[item.name])}"
            lines.append(f"  {flag:<44} = {default!s:<16} {comments.get(f'{cls.__name__}.{item.name}', '')}".rstrip())
        lines.append("")
    lines += ["recipes:", *recipes()]
    return "\n".join(lines)


def print_help() -> int:
    print(help_text())
    return 0
