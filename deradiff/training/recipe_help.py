"""What `train/align.py --help [TOPIC]` prints: every recipe key with its default and meaning,
read from the section dataclasses' docstrings (deradiff.training.recipe), the one place each
option is described.

    print(recipe_help())                         # every key: default and the start of its meaning
    print(recipe_help("model.split_backward"))   # one key: type, default, the whole description
    print(recipe_help("data"))                   # a section: all its keys in full
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import textwrap
from functools import cache

from deradiff.errors import UserError
from deradiff.training.recipe import Recipe
from deradiff.training.recipe_load import _describe_type, _schema, recipe_keys

_ENTRY = re.compile(r"^    (\w+): (.*)$")  # "    name: text" in a dedented Attributes block
_MORE = re.compile(r"^        (.*)$")  # its continuation lines


@cache
def key_descriptions() -> dict[str, str]:
    """Dotted key -> its description (one paragraph) from its section's Attributes docstring."""
    out: dict[str, str] = {}
    for section in dataclasses.fields(Recipe):
        doc = inspect.getdoc(type(getattr(Recipe(), section.name))) or ""
        lines = doc.split("Attributes:", 1)[1].splitlines() if "Attributes:" in doc else []
        name = None
        for line in lines:
            if m := _ENTRY.match(line):
                name = m.group(1)
                out[f"{section.name}.{name}"] = m.group(2).strip()
            elif (m := _MORE.match(line)) and name is not None:
                out[f"{section.name}.{name}"] += " " + m.group(1).strip()
    return out


def default_of(key: str):
    """The default value of a dotted recipe key."""
    value = Recipe()
    for part in key.split("."):
        value = getattr(value, part)
    return value


def _yaml(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, list):
        return "[" + ", ".join(_yaml(v) for v in value) + "]"
    return str(value)


def recipe_help(topic: str | None = None, width: int = 100) -> str:
    """Every key with its default and the start of its meaning (topic None), or the
    full entries of one key or one section (UserError naming the closest key otherwise)."""
    described = key_descriptions()
    keys = recipe_keys()
    if topic is None:
        lines = []
        for key in keys:
            head = f"  {key} = {_yaml(default_of(key))}"
            head = f"{head:<44} " if len(head) < 44 else f"{head}\n{'':<45}"
            lines.append(head + textwrap.shorten(described.get(key, ""), width=width - 45, placeholder=" ..."))
        return "\n".join(lines)
    chosen = [k for k in keys if k == topic or k.startswith(topic + ".")]
    if not chosen:
        close = difflib.get_close_matches(topic, keys + sorted({k.split(".")[0] for k in keys}), n=1)
        hint = f": did you mean {close[0]!r}?" if close else ""
        raise UserError(f"--help {topic}: no such recipe key or section{hint}")
    schema = _schema()
    parts = []
    for key in chosen:
        text = textwrap.fill(described.get(key, "(undocumented)"), width=width, initial_indent="    ",
                             subsequent_indent="    ")
        parts.append(f"{key}: {_describe_type(schema[key])}, default {_yaml(default_of(key))}\n{text}")
    return "\n\n".join(parts)
