"""Recipe loading: defaults <- a YAML file <- dotted `key=value` overrides, into a validated Recipe.

    recipe = load_recipe(sys.argv[1:])                        # `recipe=PATH key=value ...`
    recipe = load_recipe("toy-dpo", ["trainer.lr=1e-4"])       # a shipped recipe by name

Unknown keys (with the closest valid one), values of the wrong type and malformed items are
reported all at once, each naming the key and the fix; then `recipe_checks.validate` runs.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
from collections.abc import Iterable, Sequence
from functools import cache
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from deradiff.errors import UserError
from deradiff.training.recipe import Recipe
from deradiff.training.recipe_checks import format_errors, validate

RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"  # the shipped recipes (source checkout)


# -- the schema: dotted key -> type ------------------------------------------------------------


@cache
def _schema(cls: type = Recipe, prefix: str = "") -> dict[str, Any]:
    """Every dotted key of the recipe (sections and leaves) -> its type annotation."""
    out: dict[str, Any] = {}
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        out[key] = hints[f.name]
        if dataclasses.is_dataclass(hints[f.name]):
            out.update(_schema(hints[f.name], key + "."))
    return out


def recipe_keys() -> list[str]:
    """All settable (leaf) dotted keys, e.g. "trainer.lr"."""
    return [k for k, t in _schema().items() if not dataclasses.is_dataclass(t)]


def _describe_type(tp: Any) -> str:
    origin, args = get_origin(tp), get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin in (Union, types.UnionType) and type(None) in args:
        inner = [a for a in args if a is not type(None)]
        return f"{_describe_type(inner[0])} or null"
    if origin is list:
        return f"a list of {_describe_type(args[0]).removeprefix('a ').removeprefix('an ')}s"
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
    if tp in names:
        return names[tp]
    if dataclasses.is_dataclass(tp):
        return f"a section ({', '.join(f.name for f in dataclasses.fields(tp))})"
    return str(tp)


def _closest(word: str, choices: Iterable[str]) -> str | None:
    found = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return found[0] if found else None


def _unknown_key_message(key: str, origin: str) -> str:
    schema = _schema()
    leaves = recipe_keys()
    guess = _closest(key, leaves)
    if guess is None:  # a right name in the wrong section, e.g. "lr" or "model.lr"
        tail = key.rsplit(".", 1)[-1]
        guess = next((k for k in leaves if k.rsplit(".", 1)[-1] == tail), None)
    msg = f"unknown key {key!r} ({origin})"
    if guess:
        return f"{msg}; did you mean {guess!r}?"
    section = key.split(".", 1)[0]
    if section in schema and dataclasses.is_dataclass(schema[section]):
        valid = [f.name for f in dataclasses.fields(schema[section])]
        return f"{msg}; valid keys in {section}: {', '.join(valid)}"
    return f"{msg}; valid sections: {', '.join(f.name for f in dataclasses.fields(Recipe))}"


def _bad_value_message(key: str, value: Any, origin: str) -> str:
    tp = _schema()[key]
    if dataclasses.is_dataclass(tp):
        return f"{key} is a section, not a value ({origin}); set its keys, e.g. {key}.{dataclasses.fields(tp)[0].name}=..."
    msg = f"{key}: expected {_describe_type(tp)}, got {value!r} ({origin})"
    if get_origin(tp) is Literal and isinstance(value, str):
        guess = _closest(value, [str(a) for a in get_args(tp)])
        if guess:
            msg += f"; did you mean {guess!r}?"
    if get_origin(tp) is Literal and isinstance(value, bool):
        msg += "; YAML reads unquoted no/yes/on/off as booleans: quote the word, e.g. \"no\""
    return msg


# -- command line -------------------------------------------------------------------------------

_KEY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")


def _split_item(item: str) -> tuple[str, str]:
    """"key=value" -> (key, value), or UserError naming the malformed item."""
    if item.startswith("-"):
        hint = item.lstrip("-")
        raise UserError(
            f"malformed argument {item!r}: recipe settings are key=value without dashes"
            + (f", e.g. {hint}" if "=" in hint else ", e.g. trainer.lr=1e-4")
        )
    if "=" not in item:
        raise UserError(f"malformed argument {item!r}: expected key=value, e.g. trainer.lr=1e-4 or recipe=recipes/toy-dpo.yaml")
    key, value = item.split("=", 1)
    key = key.strip()
    if not _KEY.match(key):
        raise UserError(f"malformed key {key!r} in {item!r}: use dotted names such as trainer.lr=1e-4")
    return key, value


def parse_cli(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """Split `recipe=PATH key=value ...` into (PATH or None, ["key=value", ...]).

    Raises UserError for an item that is not key=value, a malformed key, or recipe= twice.
    """
    recipe: str | None = None
    overrides: list[str] = []
    for item in argv:
        key, value = _split_item(item)
        if key == "recipe":
            if recipe is not None:
                raise UserError(f"recipe= given twice ({recipe!r} and {value!r}); pass one recipe file")
            if not value.strip():
                raise UserError("recipe= is empty: pass a recipe file, e.g. recipe=recipes/toy-dpo.yaml")
            recipe = value.strip()
        else:
            overrides.append(f"{key}={value}")
    return recipe, overrides


# -- loading ------------------------------------------------------------------------------------


def shipped_recipes() -> list[Path]:
    """The recipes/*.yaml files of the source checkout (empty for a bare wheel install)."""
    return sorted(RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []


def resolve_recipe_path(path: str | os.PathLike) -> Path:
    """A recipe file path; a bare name such as "toy-dpo" means recipes/toy-dpo.yaml."""
    p = Path(path)
    if p.is_file():
        return p
    if p.suffix == "" and len(p.parts) == 1:
        for folder in (Path.cwd() / "recipes", RECIPES_DIR):
            if (folder / f"{p.name}.yaml").is_file():
                return folder / f"{p.name}.yaml"
    names = ", ".join(r.stem for r in shipped_recipes()) or "none found"
    what = "is a directory, not a recipe file" if p.is_dir() else "not found"
    raise UserError(f"recipe file {str(path)!r} {what}; shipped recipes ({RECIPES_DIR}): {names}")


def _duplicate_key(path: Path) -> str | None:
    """A message naming the first key that a mapping of the YAML file repeats, with both lines;
    None when there is none (or the file does not parse: the loader reports that)."""
    import yaml

    try:
        root = yaml.compose(path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    except (yaml.YAMLError, UnicodeDecodeError):
        return None

    def walk(node, prefix: str) -> str | None:
        if isinstance(node, yaml.SequenceNode):
            return next((m for child in node.value if (m := walk(child, prefix))), None)
        if not isinstance(node, yaml.MappingNode):
            return None
        first_line: dict[str, int] = {}
        for key, value in node.value:
            name = str(key.value)
            line = key.start_mark.line + 1
            if name in first_line:
                return (f"recipe {path} line {line}: duplicate key {prefix + name!r} (first at line "
                        f"{first_line[name]}): keep one, merging the two into it")
            first_line[name] = line
            if (found := walk(value, f"{prefix}{name}.")) is not None:
                return found
        return None

    return walk(root, "")


def _read_yaml(path: Path) -> dict:
    from omegaconf import OmegaConf

    duplicate = _duplicate_key(path)
    if duplicate is not None:
        raise UserError(duplicate)
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as err:  # yaml.YAMLError and omegaconf's own grammar errors
        first = str(err).strip().splitlines()
        raise UserError(f"recipe {path} is not valid YAML: {' '.join(first[:3])}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a mapping of sections (model:, data:, ...), not {type(data).__name__}")
    return data


def _flatten(data: dict, prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            items.extend(_flatten(value, dotted + "."))
        elif value is None and dotted in _SECTIONS:
            continue  # an empty section ("trainer:" with nothing under it)
        else:
            items.append((dotted, value))
    return items


_SECTIONS = {f.name for f in dataclasses.fields(Recipe)}


def _merge_item(cfg, key: str, value: Any, origin: str, errors: list[str]):
    """Merge one dotted key into the structured config; record an error message on failure."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    schema = _schema()
    if key not in schema:
        errors.append(_unknown_key_message(key, origin))
        return cfg
    value = _unbool(schema[key], value)
    if isinstance(value, bool) and key in _ON_OFF_KEYS:  # YAML reads on/off as booleans
        value = "on" if value else "off"
    nested: Any = value
    for part in reversed(key.split(".")):
        nested = {part: nested}
    try:
        return OmegaConf.merge(cfg, nested)
    except OmegaConfBaseException:
        errors.append(_bad_value_message(key, value, origin))
        return cfg


_ON_OFF_KEYS = ("data.reference_errors",)  # string keys whose words "on" / "off" YAML reads as booleans
_YAML_BOOL_WORDS = {False: ("no", "off", "false", "n"), True: ("yes", "on", "true", "y")}


def _unbool(tp: Any, value: Any) -> Any:
    """Undo YAML 1.1 reading `no`/`off`/`yes`/`on` as a boolean where a Literal of words is
    expected (e.g. `mixed_precision: no`): map it back to the one matching choice, if any."""
    if isinstance(value, bool) and get_origin(tp) is Literal:
        matches = [a for a in get_args(tp) if str(a).lower() in _YAML_BOOL_WORDS[value]]
        if len(matches) == 1:
            return matches[0]
    return value


def _parse_override(item: str) -> tuple[str, Any]:
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    key = item.split("=", 1)[0]
    try:
        parsed = OmegaConf.to_container(OmegaConf.from_dotlist([item]), resolve=False)
    except OmegaConfBaseException as err:
        raise UserError(f"cannot parse override {item!r}: {str(err).splitlines()[0]}") from None
    value: Any = parsed
    for part in key.split("."):
        value = value[part]
    return key, value


def load_recipe(
    source: str | os.PathLike | Sequence[str] | None = None, overrides: Sequence[str] = ()
) -> Recipe:
    """Resolve and validate a recipe: defaults <- YAML file <- overrides.

    Args:
        source: a recipe file (or a bare shipped name such as "toy-dpo"); or a command line
            (list of `recipe=PATH` and `key=value` items, see `parse_cli`); or None for defaults.
        overrides: extra "key=value" items, applied after those of the command line.
    Raises UserError listing every problem (unknown keys with the closest valid key, values of
    the wrong type, values out of range) before anything expensive happens.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    if source is not None and not isinstance(source, (str, os.PathLike)):
        path, cli_overrides = parse_cli(list(source))
        overrides = [*cli_overrides, *overrides]
    else:
        path = source
    cfg = OmegaConf.structured(Recipe)
    errors: list[str] = []
    given: set[str] = set()
    if path is not None:
        file = resolve_recipe_path(path)
        for key, value in _flatten(_read_yaml(file)):
            cfg = _merge_item(cfg, key, value, f"in {file}", errors)
            given.add(key)
    for item in overrides:
        if _split_item(item)[0] == "recipe":
            raise UserError(f"{item!r}: pass the recipe file as the source, not as an override")
        key, value = _parse_override(item)
        cfg = _merge_item(cfg, key, value, "on the command line", errors)
        given.add(key)
    if errors:
        raise UserError(format_errors(errors))
    try:
        recipe = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:  # e.g. an interpolation ${...} to a missing key
        raise UserError(f"cannot resolve recipe: {str(err).splitlines()[0]}") from None
    # Older names of values, read as today's, so that saved run recipes load and compare equal.
    recipe.data.source = _SOURCE_ALIASES.get(recipe.data.source, recipe.data.source)
    _apply_model_defaults(recipe, given)
    validate(recipe)
    return recipe


def _apply_model_defaults(recipe: Recipe, given: set[str]) -> None:
    """Fill model.kind and model.max_sequence_length, where the recipe leaves them unset, from the
    plug-in that registers model.name_or_path (its family; the prompt length it was trained with,
    e.g. the toy-flow twin's single T5 placeholder token). Values the recipe gives are kept."""
    from deradiff.plugins import model_entry

    entry = model_entry(recipe.model.name_or_path)
    if entry is None:
        return
    if "model.kind" not in given and entry.family in get_args(_schema()["model.kind"]):
        recipe.model.kind = entry.family
    length = entry.sampling_defaults.get("max_sequence_length")
    if "model.max_sequence_length" not in given and length is not None:
        recipe.model.max_sequence_length = length


_SOURCE_ALIASES = {"toy": "parquet"}  # data.source "toy" was the toy world's parquet files
