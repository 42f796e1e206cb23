"""Prompts from one spec, for training (KL methods) and evaluation alike.

    load_prompts("toy:test")            # a registered prompt set (the toy world's held-out captions)
    load_prompts("prompts.txt")         # one prompt per line; blank lines and # comments ignored
    load_prompts("partiprompts", 200)   # the first 200 PartiPrompts
    load_prompts("hpsv2:anime")         # one style of the HPSv2 benchmark; "hpsv2" = all four
    load_prompts("hf:yuvalkirstain/pickapic_v2_no_images:test")   # the caption column of a dataset

- NAME[:SPLIT]: a prompt set registered by a plug-in (deradiff.plugins; "toy" alone means its
  default split, toy:train).
- Named hub sets (`HUB_SETS`), streamed from the Hugging Face hub (cached after the first read):
  pickapic-test (Pick-a-Pic v2 `test_unique` captions, the Diffusion-DPO evaluation split),
  partiprompts (1632), drawbench (200), hpsv2[:style] (800 per style: anime, concept-art,
  paintings, photo; the JSON files of the HPDv2 dataset).
- hf:<dataset id>[:<split>]: the `caption` column of any hub dataset (split defaults to train).
- anything else: a text file.
Duplicates are dropped (first kept); UserError for an unknown set, a missing or empty file,
no network / cache, or no prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from deradiff.errors import UserError

HPS_STYLES = ("anime", "concept-art", "paintings", "photo")


@dataclass(frozen=True)
class HubPromptSet:
    """A prompt column of a dataset split on the Hugging Face hub."""

    dataset: str
    split: str
    column: str
    help: str


HUB_SETS: dict[str, HubPromptSet] = {
    "pickapic-test": HubPromptSet("yuvalkirstain/pickapic_v2", "test_unique", "caption",
                                  "Pick-a-Pic v2 test_unique captions (Diffusion-DPO's evaluation prompts)"),
    "partiprompts": HubPromptSet("nateraw/parti-prompts", "train", "Prompt", "PartiPrompts (1632)"),
    "drawbench": HubPromptSet("sayakpaul/drawbench", "train", "Prompts", "DrawBench (200)"),
}
HPS_DATASET = "zhwang/HPDv2"


def describe_sets() -> str:
    """One line per accepted form, for --help texts and error messages."""
    from deradiff.plugins import PROMPT_SETS, load_plugins

    load_plugins()
    registered = [f"{name}:{'|'.join(e.splits)}" for name, e in sorted(PROMPT_SETS.items())]
    named = ", ".join([*registered, *HUB_SETS, "hpsv2[:" + "|".join(HPS_STYLES) + "]"])
    return f"a text file, hf:<dataset>[:<split>], or a named set ({named})"


def names_a_set(spec: str) -> bool:
    """Whether `load_prompts` reads `spec` as a named set (registered, a hub set, hpsv2 or
    hf:<dataset>) rather than as a text file."""
    from deradiff.plugins import prompt_set_entry

    name = spec.partition(":")[0]
    return prompt_set_entry(name) is not None or name in HUB_SETS or name in ("hpsv2", "hf")


def load_prompts(spec: str, max_prompts: int | None = None) -> list[str]:
    """The prompts of `spec` (see the module docstring), at most `max_prompts`, duplicates dropped."""
    from deradiff.plugins import prompt_set_entry

    if max_prompts is not None and max_prompts < 1:
        raise UserError(f"max_prompts must be >= 1, got {max_prompts}")
    name, _, arg = spec.partition(":")
    registered = prompt_set_entry(name)
    if registered is not None:
        split = arg or registered.default_split
        if split not in registered.splits:
            raise UserError(f"unknown {name} prompt set {split!r}; choose from {list(registered.splits)}")
        prompts = registered.read(split)
    elif name in HUB_SETS:
        prompts = _hub_column(HUB_SETS[name], max_prompts)
    elif name == "hpsv2":
        prompts = _hps_benchmark(arg or None)
    elif name == "hf":
        dataset, _, split = arg.partition(":")
        prompts = _hub_column(HubPromptSet(dataset, split or "train", "caption", ""), max_prompts)
    else:
        prompts = _text_file(spec)
    prompts = list(dict.fromkeys(p.strip() for p in prompts if p and p.strip()))
    if max_prompts is not None:
        prompts = prompts[:max_prompts]
    if not prompts:
        raise UserError(f"no prompts in {spec!r}: the set or file is empty (every line blank or a # comment)")
    return prompts


def _text_file(spec: str) -> list[str]:
    from pathlib import Path

    path = Path(spec)
    if not path.is_file():
        raise UserError(f"prompt file {spec!r} not found ({describe_sets()})")
    lines = (ln.strip() for ln in path.read_text(encoding="utf-8").splitlines())
    return [ln for ln in lines if ln and not ln.startswith("#")]


def _unavailable(what: str, err: Exception) -> UserError:
    return UserError(
        f"cannot read {what} (no network and not in the Hugging Face cache?): "
        f"{str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__}. "
        "Run once with network access to cache it, or save the prompts to a text file (one per line) and pass that"
    )


def _hub_column(entry: HubPromptSet, max_prompts: int | None) -> list[str]:
    import datasets

    what = f"prompt set {entry.dataset} split {entry.split}"
    try:
        stream = datasets.load_dataset(entry.dataset, split=entry.split, streaming=True)
        if stream.column_names is not None and entry.column not in stream.column_names:
            raise UserError(f"dataset {entry.dataset!r} has no {entry.column} column "
                            f"(columns: {', '.join(stream.column_names)})")
        stream = stream.select_columns([entry.column])
        prompts: list[str] = []
        for row in stream:
            prompts.append(str(row[entry.column]))
            if max_prompts is not None and len(set(prompts)) >= max_prompts:
                break
        return prompts
    except UserError:
        raise
    except Exception as err:  # network, cache and schema errors all mean: this set is not at hand
        raise _unavailable(what, err) from None


def _hps_benchmark(style: str | None) -> list[str]:
    if style is not None and style not in HPS_STYLES:
        raise UserError(f"unknown HPSv2 benchmark style {style!r}; choose from {list(HPS_STYLES)} or omit it for all")
    from huggingface_hub import hf_hub_download

    prompts: list[str] = []
    for s in [style] if style else HPS_STYLES:
        try:
            path = hf_hub_download(HPS_DATASET, f"{s}.json", subfolder="benchmark", repo_type="dataset")
        except Exception as err:
            raise _unavailable(f"HPSv2 benchmark prompts {HPS_DATASET}/benchmark/{s}.json", err) from None
        prompts += [str(p) for p in json.loads(open(path, encoding="utf-8").read())]
    return prompts
