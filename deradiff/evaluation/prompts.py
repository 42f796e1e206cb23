"""Prompt sets for evaluation: the ones the literature reports on, plain text files, the toy split.

    load_prompt_set("toy:test")            # the 12 held-out toy captions (the embedded default)
    load_prompt_set("prompts.txt")         # one prompt per line, # comments
    load_prompt_set("partiprompts", 200)   # the first 200 PartiPrompts
    load_prompt_set("hpsv2:anime")         # one style of the HPSv2 benchmark; "hpsv2" = all four

Named sets (`PROMPT_SETS`), read from the Hugging Face hub (cached after the first read):
- pickapic-test: Pick-a-Pic v2 `test_unique` captions (500), the Diffusion-DPO evaluation split;
  streamed, so the images in the same parquet files are not downloaded as a whole.
- partiprompts: PartiPrompts (1632; nateraw/parti-prompts, column Prompt).
- drawbench: DrawBench (200; sayakpaul/drawbench, column Prompts).
- hpsv2[:style]: the HPSv2 benchmark prompts (800 per style: anime, concept-art, paintings,
  photo), the JSON files of the HPDv2 dataset.
Anything else goes to `deradiff.training.data.load_prompts` (text file, "toy:train|test|all",
"hf:<dataset id>[:<split>]" with a `caption` column). Duplicates are dropped, first kept.
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


PROMPT_SETS: dict[str, HubPromptSet] = {
    "pickapic-test": HubPromptSet("yuvalkirstain/pickapic_v2", "test_unique", "caption",
                                  "Pick-a-Pic v2 test_unique captions (Diffusion-DPO's evaluation prompts)"),
    "partiprompts": HubPromptSet("nateraw/parti-prompts", "train", "Prompt", "PartiPrompts (1632)"),
    "drawbench": HubPromptSet("sayakpaul/drawbench", "train", "Prompts", "DrawBench (200)"),
}
HPS_DATASET = "zhwang/HPDv2"


def describe_sets() -> str:
    """One line per accepted form, for --help texts and error messages."""
    named = ", ".join([*PROMPT_SETS, "hpsv2[:" + "|".join(HPS_STYLES) + "]"])
    return f"a text file, toy:train|test|all, hf:<dataset>[:<split>], or a named set ({named})"


def load_prompt_set(spec: str, max_prompts: int | None = None) -> list[str]:
    """The prompts of `spec` (see the module docstring), at most `max_prompts`, duplicates dropped.
    UserError for an unknown set, a missing file, no network / cache, or an empty set."""
    if max_prompts is not None and max_prompts < 1:
        raise UserError(f"max_prompts must be >= 1, got {max_prompts}")
    name, _, arg = spec.partition(":")
    if name in PROMPT_SETS:
        prompts = _hub_column(PROMPT_SETS[name], max_prompts)
    elif name == "hpsv2":
        prompts = _hps_benchmark(arg or None)
    else:
        from deradiff.training.data import load_prompts

        return load_prompts(spec, max_prompts)
    prompts = list(dict.fromkeys(p.strip() for p in prompts if p and p.strip()))
    if max_prompts is not None:
        prompts = prompts[:max_prompts]
    if not prompts:
        raise UserError(f"prompt set {spec!r} is empty")
    return prompts


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
        stream = stream.select_columns([entry.column])
        prompts: list[str] = []
        for row in stream:
            prompts.append(str(row[entry.column]))
            if max_prompts is not None and len(set(prompts)) >= max_prompts:
                break
        return prompts
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
