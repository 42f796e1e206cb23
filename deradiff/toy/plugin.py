"""The toy world as a plug-in: registers its pipelines ("toy", a tiny StableDiffusionPipeline;
"toy-flow", its flow-matching twin, a tiny StableDiffusion3Pipeline), its prompt sets ("toy:train",
"toy:test", "toy:all"), its fidelity judge ("toy": classifier adherence, KID, diversity) and its
rewards ("toy": vividness; "toy_contrast": luminance contrast, another optimum) through the same
registries a real model family, prompt set or reward uses."""

from __future__ import annotations

from collections.abc import Sequence

from deradiff.plugins import (
    JudgeEntry,
    ModelEntry,
    PromptSetEntry,
    register_judge,
    register_model,
    register_prompt_set,
)

PREFS_HINT = "make the toy preference pairs with `deradiff toy make-prefs`"
# The toy judge's columns (deradiff.toy.metrics): keys of FidelityJudge.adherence -> results column;
# the names are those of existing result folders and committed reports, so they stay.
JUDGE_IMAGE_METRICS = {"color": "fidelity/color_acc", "shape": "fidelity/shape_acc",
                       "background": "fidelity/background_acc", "all": "fidelity/adherence"}
JUDGE_SET_METRICS = ("fidelity/kid", "fidelity/diversity_rel")  # per prompt, from all its seeds' images


def _load_pipeline(dtype=None, device: str = "cpu", components: dict | None = None):
    from deradiff.toy.pipeline import load_toy_pipeline

    return _placed(load_toy_pipeline(components=components), dtype, device, components)


def _load_flow_pipeline(dtype=None, device: str = "cpu", components: dict | None = None):
    from deradiff.toy.flow import load_flow_pipeline

    return _placed(load_flow_pipeline(components=components), dtype, device, components)


def _placed(pipe, dtype, device: str, components: dict | None):
    """`pipe` on `device`, its loaded modules in `dtype`; modules handed in `components` (a trained
    denoiser) keep their dtypes, as diffusers' from_pretrained(torch_dtype=...) leaves them."""
    import torch

    pipe = pipe.to(device)
    if dtype not in (None, torch.float32):
        for name, module in pipe.components.items():
            if isinstance(module, torch.nn.Module) and name not in (components or {}):
                module.to(dtype=dtype)
    return pipe


def _flow_identity() -> dict:
    """The shipped flow twin's manifest hash: re-pretrained weights make other samples."""
    from deradiff.io import sha256_file
    from deradiff.toy.flow import FLOW_ASSET_DIR
    from deradiff.toy.store import MANIFEST_NAME

    manifest = FLOW_ASSET_DIR / MANIFEST_NAME
    return {"toy_flow_manifest_sha256": sha256_file(manifest) if manifest.exists() else None}


def _pipeline_identity() -> dict:
    """The shipped weights' manifest hash: re-pretrained toy weights make other samples."""
    from deradiff.io import sha256_file
    from deradiff.toy.store import ASSET_DIR, MANIFEST_NAME

    manifest = ASSET_DIR / MANIFEST_NAME
    return {"toy_manifest_sha256": sha256_file(manifest) if manifest.exists() else None}


def _check_prompt(prompt: str) -> None:
    from deradiff.toy.pipeline import check_prompt

    check_prompt(prompt)


def _read_prompts(split: str) -> list[str]:
    from deradiff.toy.prompts import prompt_set

    return prompt_set(split)


def _accepts(prompts: Sequence[str]) -> bool:
    from deradiff.toy.domain import parse_caption

    try:
        for prompt in prompts:
            parse_caption(prompt)
    except ValueError:
        return False
    return True


def _load_judge(weights: str | None = None, device: str = "cpu"):
    from deradiff.toy.classifier import load_classifier
    from deradiff.toy.metrics import FidelityJudge

    return FidelityJudge(load_classifier(weights).to(device))


def _judge_identity(weights: str | None) -> dict:
    from pathlib import Path

    from deradiff.errors import UserError
    from deradiff.io import sha256_file
    from deradiff.toy.classifier import WEIGHTS_NAME
    from deradiff.toy.store import ASSET_DIR

    root = Path(weights) if weights else ASSET_DIR
    candidates = [root / WEIGHTS_NAME, root / "classifier" / WEIGHTS_NAME]
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        raise UserError(f"no toy classifier at {root} (looked for {[str(p) for p in candidates]}): pass "
                        "--classifier DIR, rebuild the toy assets with `deradiff toy pretrain`, or --fidelity none")
    return {"classifier_sha256": sha256_file(found)}


def register() -> None:
    from deradiff.rewards import RewardEntry, register_reward
    from deradiff.toy.flow import T5_TOKENS, flow_sampling_kwargs
    from deradiff.toy.pipeline import toy_sampling_kwargs

    register_model("toy", ModelEntry(
        load=_load_pipeline, help="the embedded toy world (tiny StableDiffusionPipeline, shipped weights)",
        family="sd15", sampling_defaults=toy_sampling_kwargs(), check_prompt=_check_prompt,
        identity=_pipeline_identity, default_prompts="toy:train", prefs_hint=PREFS_HINT,
    ))
    register_model("toy-flow", ModelEntry(
        load=_load_flow_pipeline,
        help=f"the toy world's flow-matching twin (tiny StableDiffusion3Pipeline without T5, shipped weights; "
             f"encode prompts with max_sequence_length={T5_TOKENS})",
        family="sd3", sampling_defaults=flow_sampling_kwargs(), check_prompt=_check_prompt,
        identity=_flow_identity, default_prompts="toy:train", prefs_hint=PREFS_HINT,
    ))
    register_prompt_set("toy", PromptSetEntry(
        read=_read_prompts, splits=("train", "test", "all"), default_split="train",
        help="the toy world's captions (held-out test split, training split, all)",
    ))
    register_judge("toy", JudgeEntry(
        accepts=_accepts, load=_load_judge, identity=_judge_identity,
        help="toy classifier: color/shape/background adherence per image; KID and diversity per prompt",
        image_metrics=JUDGE_IMAGE_METRICS, set_metrics=JUDGE_SET_METRICS,
    ))
    register_reward("toy", RewardEntry("deradiff.toy.reward", "ToyReward", True,
                                       "toy world: mean chroma of the blurred image (vivid, large shapes); hackable"))
    register_reward("toy_contrast", RewardEntry(
        "deradiff.toy.reward", "ToyContrastReward", True,
        "toy world: luma variance of the blurred image (large, high-contrast shapes; optimum half black, half "
        "white, where 'toy' is 0); a second objective for multi-objective realignment"))
