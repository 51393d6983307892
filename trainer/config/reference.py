"""The config reference (`mdt-train --reference`, README): every key with its default and the
docstring written under its field."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import typing
from typing import Dict

from .schema import TrainConfig, plain
from .validation import CHOICES


def field_docs(cls: type) -> Dict[str, str]:
    """The docstring written under each field of a config dataclass (read from the source)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def reference_markdown() -> str:
    """Markdown tables of every config key with its default, docstring and, for keys that name a
    registry entry, the registry's names (for README / --reference)."""
    lines = []
    defaults = TrainConfig()
    for section in dataclasses.fields(TrainConfig):
        cls = typing.get_type_hints(TrainConfig)[section.name]
        lines += [f"**{section.name}** ({cls.__doc__.strip()})", "", "| key | default | meaning |", "|---|---|---|"]
        docs = field_docs(cls)
        for f in dataclasses.fields(cls):
            key = f"{section.name}.{f.name}"
            value = plain(getattr(getattr(defaults, section.name), f.name))
            meaning = docs.get(f.name, "")
            if key in CHOICES:  # listed from the registry that validates and builds the value
                meaning += " One of: " + ", ".join(f"`{name}`" for name in CHOICES[key]) + "."
            lines.append(f"| `{key}` | `{value}` | {meaning} |")
        lines.append("")
    return "\n".join(lines)
