"""Registries that plug-ins fill: models (pipelines by name), prompt sets and fidelity judges.

Nothing in the core, training or evaluation knows any particular plug-in. A plug-in is a module
with a `register()` function that calls `register_model`, `register_prompt_set`,
`register_judge` (and `deradiff.rewards.register_reward`); the shipped toy world is one
(`deradiff/toy/plugin.py`). Plug-ins are imported on the first lookup: the built-in ones by
module path, third-party ones from the `deradiff.plugins` entry-point group:

    # pyproject.toml of a third-party package
    [project.entry-points."deradiff.plugins"]
    my_family = "my_package.deradiff_plugin"     # a module with register()
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from deradiff.errors import UserError

BUILTIN_PLUGINS = ("deradiff.toy.plugin",)
ENTRY_POINT_GROUP = "deradiff.plugins"
FIDELITY_PREFIX = "fidelity/"  # the namespace of judge metrics in results tables


@dataclass(frozen=True)
class ModelEntry:
    """A pipeline usable by name wherever a pipeline is named (`--pipeline`, `model.name_or_path`).

    load: (dtype, device) -> a diffusers pipeline; a loader that also takes `components` (as
        deradiff.models.load_pipeline does: a module, or None to leave it out) is handed them.
    family: the recipe's model.family for it ("sd15", "sdxl", ...).
    sampling_defaults: keyword arguments for `pipe(prompts, **kwargs)` (steps, guidance, size,
        output_type) that replace the command-line defaults.
    check_prompt: raises UserError for a prompt the model cannot draw (None: any prompt).
    identity: what makes its samples (e.g. a hash of its weights), stored by resumable commands.
    default_prompts: prompt-set spec used by sampling-based training when data.prompts is unset.
    prefs_hint: how to make preference pairs for it, appended to "file not found" errors.
    """

    load: Callable[..., Any]
    help: str
    family: str = "sd15"
    sampling_defaults: dict = field(default_factory=dict)
    check_prompt: Callable[[str], Any] | None = None
    identity: Callable[[], dict] | None = None
    default_prompts: str | None = None
    prefs_hint: str | None = None


@dataclass(frozen=True)
class PromptSetEntry:
    """Named prompt lists read as "NAME:SPLIT" (or "NAME" for the default split)."""

    read: Callable[[str], list[str]]
    splits: tuple[str, ...]
    default_split: str
    help: str


@dataclass(frozen=True)
class JudgeEntry:
    """Prior-fidelity metrics for prompts of a known world (e.g. the toy classifier).

    accepts(prompts) -> bool: whether every prompt is one the judge can score.
    load(weights, device) -> judge with `adherence(images, prompts)` -> {key: (N,) tensor} and
        `metrics(images, prompts, n_boot=...)` -> {name: Estimate}; images (N, 3, H, W) in [-1, 1].
    identity(weights) -> dict stored by resumable commands (hash of the judge's weights).
    image_metrics: per-image columns of the results table, as {key of `adherence(...)`: column},
        e.g. {"all": "fidelity/adherence"}; a bool per image is stored as 0.0 / 1.0.
    set_metrics: per-prompt metrics computed from all of a prompt's images (its seeds), names
        that `metrics(...)` returns, e.g. ("fidelity/kid",); they need >= 2 seeds.
    Every column and set metric is namespaced "fidelity/" (how the results table finds them).
    """

    accepts: Callable[[Sequence[str]], bool]
    load: Callable[..., Any]
    identity: Callable[[str | None], dict]
    help: str
    image_metrics: Mapping[str, str] = field(default_factory=dict)
    set_metrics: tuple[str, ...] = ()

    def __post_init__(self):
        names = [*self.image_metrics.values(), *self.set_metrics]
        if not names:
            raise ValueError("a JudgeEntry declares at least one metric (image_metrics or set_metrics)")
        bad = [n for n in names if not n.startswith(FIDELITY_PREFIX)]
        if bad or len(set(names)) != len(names):
            raise ValueError(f"judge metric names must be distinct and start with {FIDELITY_PREFIX!r}, got {names}")

    @property
    def metric_names(self) -> list[str]:
        """Every metric the judge adds: per-image columns, then per-prompt set metrics."""
        return [*self.image_metrics.values(), *self.set_metrics]


MODELS: dict[str, ModelEntry] = {}
PROMPT_SETS: dict[str, PromptSetEntry] = {}
JUDGES: dict[str, JudgeEntry] = {}
_loaded = False


def register_model(name: str, entry: ModelEntry) -> None:
    MODELS[name] = entry


def register_prompt_set(name: str, entry: PromptSetEntry) -> None:
    PROMPT_SETS[name] = entry


def register_judge(name: str, entry: JudgeEntry) -> None:
    JUDGES[name] = entry


def load_plugins() -> None:
    """Import every plug-in once (built-in, then entry points) and call its register()."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    modules = list(BUILTIN_PLUGINS)
    from importlib.metadata import entry_points

    modules += [ep.value for ep in entry_points(group=ENTRY_POINT_GROUP) if ep.value not in modules]
    for name in modules:
        importlib.import_module(name).register()


def model_entry(name: str) -> ModelEntry | None:
    """The registered model called `name`, or None (then `name` is a folder or hub id)."""
    load_plugins()
    return MODELS.get(name)


def prompt_set_entry(name: str) -> PromptSetEntry | None:
    load_plugins()
    return PROMPT_SETS.get(name)


def judge_names() -> list[str]:
    load_plugins()
    return sorted(JUDGES)


def judge_entry(name: str) -> JudgeEntry:
    load_plugins()
    if name not in JUDGES:
        raise UserError(f"unknown fidelity judge {name!r}; registered: {sorted(JUDGES) or 'none'}")
    return JUDGES[name]


def judge_for(prompts: Sequence[str]) -> str | None:
    """The first registered judge that accepts every prompt, or None."""
    load_plugins()
    return next((name for name, entry in sorted(JUDGES.items()) if entry.accepts(prompts)), None)
