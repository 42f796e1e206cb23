"""Training recipes: typed dataclasses, YAML files, dotted `key=value` overrides, one validation.

A recipe is resolved as defaults (declared once, in the dataclasses below) <- a YAML file
<- command-line overrides, the form `train/align.py recipe=recipes/toy-dpo.yaml trainer.lr=1e-4
method.beta=2500`. Every problem (unknown key, wrong type, value out of range, missing file) is
reported before any model is loaded, all problems at once, each naming the key and the fix:

    recipe = load_recipe(sys.argv[1:])      # parse_cli + load + validate
    save_resolved(recipe, run_dir)          # run_dir/recipe.yaml, itself a loadable recipe
    check_resume(recipe, run_dir)           # refuse to resume a run of a different recipe

The resolved recipe in a run directory is a complete recipe file: `recipe=RUN/recipe.yaml`
reproduces the run.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import math
import os
import re
import sys
import types
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from deradiff.errors import UserError

RECIPE_FILE = "recipe.yaml"  # the resolved recipe inside a run directory
RECIPES_DIR = Path(__file__).resolve().parents[2] / "recipes"  # the shipped recipes (source checkout)

MethodName = Literal["dpo", "kl_grad", "kl_pg"]
FLOW_KINDS = ("sd3", "flux")  # model.kind values of rectified-flow transformers


@dataclass
class ModelSection:
    """The base pipeline to align.

    Attributes:
        name_or_path: a model registered by a plug-in (deradiff.plugins; "toy" is the embedded
            toy world), a hub id such as "stable-diffusion-v1-5/stable-diffusion-v1-5", or a
            local pipeline folder.
        kind: the model family (deradiff.training.families), checked against the loaded
            pipeline: "sd15" (UNet, one CLIP text encoder; the toy pipeline), "sdxl" (UNet, two
            text encoders, pooled embeds and time ids from original size and crop), "sd3"
            (SD3/SD3.5 MM-DiT transformer, CLIP-L + CLIP-G + T5, rectified flow) or "flux"
            (FLUX.1 transformer on packed latents, CLIP-L pooled + T5, rectified flow; FLUX.1-dev
            takes method.guidance_scale as an input).
        revision: hub revision (branch, tag or commit) of the pipeline; null = main.
        variant: weight file variant to load, e.g. "fp16"; null = the full-precision files.
        vae_name_or_path: a separate VAE, e.g. "madebyollin/sdxl-vae-fp16-fix" (SDXL's own VAE
            overflows in fp16, as the official SDXL DPO launcher notes); null = the pipeline's.
        mixed_precision: "no", "fp16" or "bf16"; frozen weights run in this dtype, the LoRA
            parameters stay in fp32.
        gradient_checkpointing: recompute UNet / transformer activations in the backward pass
            (less memory, about 30% more time); needed for SD-scale DPO and for backpropagating
            through sampling steps (kl_grad).
        max_sequence_length: sd3 / flux: T5 tokens per prompt; null = the pipeline's default
            (SD3 256, FLUX 512). Flow-GRPO trains SD3.5 with 128; fewer tokens, less memory.
        drop_text_encoders: kl_grad / kl_pg: encode the training and evaluation prompts (and "")
            once at the start, keep the embeddings on the CPU, and delete the text encoders
            (SD3's and FLUX's T5-XXL is ~9.5 GB in bf16). Every process then holds every
            prompt's embeddings (SD3.5 at 128 T5 tokens: ~1.7 MB per prompt): for prompt lists
            of thousands, not millions. Needs sample.prompts empty (sample grids encode their
            prompts). dpo encodes each batch's captions: keep it false there.
    """

    name_or_path: str = "toy"
    kind: Literal["sd15", "sdxl", "sd3", "flux"] = "sd15"
    revision: str | None = None
    variant: str | None = None
    vae_name_or_path: str | None = None
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    gradient_checkpointing: bool = False
    max_sequence_length: int | None = None
    drop_text_encoders: bool = False


@dataclass
class LoraSection:
    """The trained adapter (peft LoRA on the UNet attention projections).

    Attributes:
        rank: LoRA rank r.
        alpha: LoRA alpha; the update is scaled by alpha / rank. null = rank (scale 1), as
            diffusers' DPO scripts do.
        dropout: dropout on the LoRA branch input, in [0, 1).
        target_modules: module names (suffixes) that get a LoRA, peft's `target_modules`. SD3 /
            FLUX joint-attention blocks: add the text stream's add_q_proj, add_k_proj,
            add_v_proj and to_add_out (as Flow-GRPO and diffusers' SD3/FLUX LoRA scripts do).
    """

    rank: int = 8
    alpha: float | None = None
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class DataSection:
    """Training data: preference pairs (dpo) or prompts (kl_grad, kl_pg).

    Attributes:
        source: "parquet" (local Pick-a-Pic-format parquet files, such as the toy set that
            `deradiff toy make-prefs` writes) or "hub" (a Hugging Face dataset id in `path`, e.g.
            "yuvalkirstain/pickapic_v2"). "toy" is an older name of "parquet", read as it.
        path: a parquet file, a folder of *.parquet, or a glob (parquet); the dataset id (hub).
        revision: hub dataset revision; null = main.
        split: the dataset split to train on (hub), e.g. "train".
        eval_path: parquet of held-out pairs for implicit accuracy (parquet); null = none.
        eval_split: held-out split of the hub dataset, e.g. "validation_unique"; null = none.
        max_eval_samples: cap on held-out pairs evaluated; null = all.
        streaming: stream the dataset instead of downloading it first (hub or parquet). Each
            process reads its own shard, shuffled through a 1000-row buffer reseeded per epoch;
            resuming re-reads the shard up to the saved step (deradiff.training.data_order.StreamOrder).
        cache_dir: datasets cache folder; null = the datasets default.
        resolution: training side length in pixels; images are resized (shorter side) and cropped.
        random_crop: random crop (else center crop) after resizing, as the official code.
        random_flip: random horizontal flip, the same for both images of a pair.
        max_train_samples: use only this many pairs (first of a seeded shuffle); null = all.
        verify_images: decode every image once before training, so that corrupt rows are
            dropped and counted up front; false = detect them lazily while training.
        prompts: prompts for kl_grad / kl_pg (see deradiff.prompts.load_prompts): a text file (one
            per line, # comments), a registered prompt set such as "toy:train" / "toy:test", or
            "hf:<dataset id>[:<split>]" (its `caption` column); null = the default prompt set
            that the model's plug-in registers (ModelEntry.default_prompts), if any.
        eval_prompts: kl_grad / kl_pg: held-out prompts of the periodic evaluation (eval/kl/*),
            same forms; null = no evaluation. (dpo evaluates on eval_path / eval_split; sample
            grids use sample.prompts.)
        num_workers: dpo: DataLoader worker processes that decode, resize, crop, flip and collate
            preference pairs ahead of training; null = min(4, CPUs - 1) (0 where processes
            cannot be forked); 0 = in the training process. The batches are the same for any
            value (augmentation is keyed by pair, not by worker). A streamed set is read ahead by
            one thread instead (datasets reorders a stream read inside worker processes).
        prefetch_factor: micro-batches each worker prepares ahead (with num_workers > 0).
        latent_cache: dpo: a folder written by `deradiff cache` (this recipe's VAE posteriors of
            both flips and text embeddings, see deradiff.training.cache): training reads it
            instead of decoding images and running the VAE and text encoders, which are then not
            kept in memory. Refused when made for other data, model, resolution or augmentation.
            Needs data.random_crop=false and data.streaming=false. null = no cache.
        reference_errors: dpo with data.latent_cache: store the frozen reference's per-pair
            errors of each keyed (timestep, noise) draw and read them in later runs, which then
            skip the reference forward (every run of a beta sweep draws the same ones; see
            deradiff.training.reference_errors). "on": in data.latent_cache/reference-errors;
            a folder path: there (e.g. when the cache folder is read-only); "off": not stored.
            Stores made with other settings (seed, precision, model, ...) are noted and ignored.
            Logged as data/reference_errors_stored and data/reference_errors_computed.
    """

    source: Literal["parquet", "hub", "toy"] = "parquet"
    path: str = "runs/toy-prefs/train.parquet"
    revision: str | None = None
    split: str = "train"
    eval_path: str | None = "runs/toy-prefs/test.parquet"
    eval_split: str | None = None
    max_eval_samples: int | None = 512
    streaming: bool = False
    cache_dir: str | None = None
    resolution: int = 32
    random_crop: bool = False
    random_flip: bool = True
    max_train_samples: int | None = None
    verify_images: bool = True
    prompts: str | None = None
    eval_prompts: str | None = None
    num_workers: int | None = None
    prefetch_factor: int = 2
    latent_cache: str | None = None
    reference_errors: str = "off"


@dataclass
class MethodSection:
    """The alignment objective.

    Attributes:
        name: "dpo" (Diffusion-DPO on preference pairs), "kl_grad" (reward gradient through the
            last sampling steps plus beta x per-step KL, DRaFT-K style) or "kl_pg" (DDPO-style PPO
            on per-step log-probabilities plus the per-step KL penalty; any reward).
        beta: the KL weight. Required: its scale depends on the method and, for dpo, on
            beta_convention (official: 2000 for SD1.5 in the paper, 5000 for SDXL; flow models
            use much smaller values, e.g. 100 for SD3.5-M in Flow-GRPO's DPO).
        beta_convention: dpo only. "official": loss = -log sigmoid(-(beta/2) * margin diff)
            (Salesforce DiffusionDPO, diffusers' SDXL script); "diffusers": without the 1/2
            (diffusers' SD1.5 script, beta 2500). official beta 5000 == diffusers beta 2500.
        eval_draws: dpo: keyed (timestep, noise) draws per held-out pair at each evaluation.
            eval/dpo/* average over them; eval/dpo/ranking_acc is the implicit accuracy of each
            pair's draw-averaged margin (a single draw's sign, eval/dpo/implicit_acc, is a much
            noisier estimate of whether the model ranks the pair right).
        reward: kl_*: reward name in the registry, called as reward(images, prompts) -> (B,).
        num_steps: kl_*: sampling steps of the training rollouts.
        eta: kl_*, UNet families: DDIM eta of the rollouts, > 0 (the per-step KL needs a
            stochastic sampler). 1.0 is DDPM's posterior variance, the memoryless schedule under
            which the KL-regularized optimum is exactly p_ref * exp(r / beta); eta < 1 is not memoryless.
        noise_level: kl_*, flow families (sd3, flux): noise_level of the rollouts' SDE sampler
            (deradiff.flow.FlowMatchSDEScheduler, Flow-GRPO's SDE; 0.7 is Flow-GRPO's default),
            > 0. sqrt(2) ~ 1.414 is the memoryless schedule (DDPM's, in flow form); below it the
            final image keeps a correlation with the starting noise.
        guidance_scale: kl_*: classifier-free guidance of the rollouts; 1.0 = none. flux: the
            distilled guidance input of FLUX.1-dev in rollouts and DPO (3.5 is FLUX.1-dev's
            default), not two branches.
        sigma_sampling: dpo, flow families: how the training sigma of a pair is drawn, as
            diffusers' SD3/FLUX scripts do (compute_density_for_timestep_sampling): "uniform" or
            "logit_normal" (SD3's default), indexing the scheduler's shifted training sigmas.
        logit_mean: mean of the logit-normal sigma sampling (SD3: 0).
        logit_std: its std (SD3: 1), > 0.
        truncation_steps: kl_grad: K, the number of final sampling steps the reward gradient
            flows through (DRaFT-K); 1 <= K <= num_steps.
        samples_per_prompt: kl_pg: images per prompt in a rollout batch, for per-prompt
            advantage normalization (>= 2; per_device_batch_size must be a multiple).
        clip_range: kl_pg: PPO ratio clip (DDPO: 1e-4, with per-dimension mean log-probs).
        adv_clip_max: kl_pg: advantages are clamped to [-adv_clip_max, adv_clip_max].
        num_inner_epochs: kl_pg: optimization passes over each rollout batch.
        log_prob: kl_pg: "mean" (DDPO, per latent dimension) or "sum" (exact log density)
            reduction of per-step log-probabilities in the PPO ratio.
    """

    name: MethodName = "dpo"
    beta: float | None = None
    beta_convention: Literal["official", "diffusers"] = "official"
    eval_draws: int = 4
    reward: str = "toy"
    num_steps: int = 20
    eta: float = 1.0
    guidance_scale: float = 1.0
    truncation_steps: int = 1
    samples_per_prompt: int = 4
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    num_inner_epochs: int = 1
    log_prob: Literal["mean", "sum"] = "mean"
    noise_level: float = 0.7
    sigma_sampling: Literal["uniform", "logit_normal"] = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0


@dataclass
class TrainerSection:
    """Optimization, cadences and the run directory.

    Attributes:
        output_dir: the run directory (resolved recipe, checkpoints, logs, LoRA, samples).
        resume: "auto": continue from the latest checkpoint in output_dir, refusing if the
            recipe differs (beyond RESUME_SAFE_KEYS); "force": continue even if it differs;
            "never": refuse to start when output_dir already holds checkpoints.
        seed: seed of data order, noise, timesteps and LoRA init.
        max_steps: optimizer steps.
        per_device_batch_size: pairs (dpo) or sampled images (kl_*) per process per micro-batch.
        gradient_accumulation: micro-batches per optimizer step; global batch =
            per_device_batch_size x processes x gradient_accumulation.
        lr: peak learning rate (no automatic scaling by batch size).
        lr_scheduler: a diffusers `get_scheduler` name.
        warmup_steps: linear warmup steps (constant_with_warmup, linear, cosine, ...).
        optimizer: "adamw" (torch) or "adamw8bit" (bitsandbytes).
        weight_decay: AdamW weight decay.
        max_grad_norm: clip the global gradient norm to this; 0 = no clipping.
        log_every: log metrics every N steps.
        checkpoint_every: save a resumable checkpoint every N steps (and at the end).
        keep_checkpoints: how many recent checkpoints to keep.
        eval_every: evaluate on held-out data every N steps; 0 = never.
        sample_every: write a sample grid every N steps; 0 = only at the end.
        compile: torch.compile the denoiser (inductor; the first steps compile, which takes
            minutes at SD size and needs a C++ compiler on CPU). Same numbers to float
            tolerance. Memory knobs live in the model section (mixed_precision,
            gradient_checkpointing); attention is diffusers' SDPA processor by default.
    """

    output_dir: str = "runs/align"
    resume: Literal["auto", "force", "never"] = "auto"
    seed: int = 0
    max_steps: int = 300
    per_device_batch_size: int = 16
    gradient_accumulation: int = 1
    lr: float = 1e-4
    lr_scheduler: Literal[
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial"
    ] = "constant_with_warmup"
    warmup_steps: int = 0
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    log_every: int = 1
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    eval_every: int = 0
    sample_every: int = 0
    compile: bool = False


@dataclass
class SampleSection:
    """Sample grids written during and after training (not used by the loss).

    Attributes:
        prompts: prompts of the grid (rows); empty = no sample grids.
        images_per_prompt: images per prompt (columns of the grid).
        num_inference_steps: sampler steps.
        guidance_scale: classifier-free guidance scale.
        scheduler: sampler name (see deradiff.models.SCHEDULERS).
        seed: seed of the grid's initial noise (the same at every step, so grids compare).
    """

    prompts: list[str] = field(default_factory=list)
    images_per_prompt: int = 4
    num_inference_steps: int = 25
    guidance_scale: float = 3.0
    scheduler: str = "ddim"
    seed: int = 0


@dataclass
class SweepSection:
    """Baselines for validating realignment: one run per lambda at beta = method.beta / lambda.

    Attributes:
        lambdas: realignment strengths to train baselines for; 1.0 is the base run itself.
            Empty = no sweep. See `sweep_recipes`.
        index: train only the index-th lambda (e.g. a SLURM array task id); null = all of them.
    """

    lambdas: list[float] = field(default_factory=list)
    index: int | None = None


@dataclass
class Recipe:
    """Everything one training run needs. Sections: model, lora, data, method, trainer, sample, sweep."""

    model: ModelSection = field(default_factory=ModelSection)
    lora: LoraSection = field(default_factory=LoraSection)
    data: DataSection = field(default_factory=DataSection)
    method: MethodSection = field(default_factory=MethodSection)
    trainer: TrainerSection = field(default_factory=TrainerSection)
    sample: SampleSection = field(default_factory=SampleSection)
    sweep: SweepSection = field(default_factory=SweepSection)


# Keys that may change when a run is resumed (the rest must equal the saved recipe).
RESUME_SAFE_KEYS: tuple[str, ...] = (
    "trainer.max_steps",
    "trainer.resume",
    "trainer.log_every",
    "trainer.checkpoint_every",
    "trainer.keep_checkpoints",
    "trainer.eval_every",
    "trainer.sample_every",
    "data.max_eval_samples",
    "data.cache_dir",
    "data.num_workers",
    "data.prefetch_factor",
    "data.latent_cache",  # checked against the recipe by its identity, wherever it lies
    "data.reference_errors",  # stored errors are those the run computes (keyed by everything they depend on)
    "sample",
    "sweep",
)


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
    if path is not None:
        file = resolve_recipe_path(path)
        for key, value in _flatten(_read_yaml(file)):
            cfg = _merge_item(cfg, key, value, f"in {file}", errors)
    for item in overrides:
        if _split_item(item)[0] == "recipe":
            raise UserError(f"{item!r}: pass the recipe file as the source, not as an override")
        key, value = _parse_override(item)
        cfg = _merge_item(cfg, key, value, "on the command line", errors)
    if errors:
        raise UserError(_format_errors(errors))
    try:
        recipe = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as err:  # e.g. an interpolation ${...} to a missing key
        raise UserError(f"cannot resolve recipe: {str(err).splitlines()[0]}") from None
    # Older names of values, read as today's, so that saved run recipes load and compare equal.
    recipe.data.source = _SOURCE_ALIASES.get(recipe.data.source, recipe.data.source)
    validate(recipe)
    return recipe


_SOURCE_ALIASES = {"toy": "parquet"}  # data.source "toy" was the toy world's parquet files


def _format_errors(errors: list[str]) -> str:
    if len(errors) == 1:
        return f"recipe: {errors[0]}"
    return f"recipe has {len(errors)} problems:\n" + "\n".join(f"  - {e}" for e in errors)


# -- validation ---------------------------------------------------------------------------------


def validation_errors(recipe: Recipe) -> list[str]:
    """Every range and cross-field problem of a recipe, as messages naming the key and the fix."""
    e: list[str] = []
    m, lo, d, me, t, s = recipe.model, recipe.lora, recipe.data, recipe.method, recipe.trainer, recipe.sample

    def need(ok: bool, msg: str) -> None:
        if not ok:
            e.append(msg)

    def finite(x: float) -> bool:
        return isinstance(x, (int, float)) and math.isfinite(x)

    need(bool(m.name_or_path.strip()), "model.name_or_path is empty: use a registered model (e.g. toy), a hub id "
         "or a local folder")

    need(lo.rank >= 1, f"lora.rank must be >= 1, got {lo.rank}")
    need(lo.alpha is None or (finite(lo.alpha) and lo.alpha > 0), f"lora.alpha must be > 0 or null, got {lo.alpha}")
    need(0 <= lo.dropout < 1, f"lora.dropout must be in [0, 1), got {lo.dropout}")
    need(len(lo.target_modules) > 0 and all(x.strip() for x in lo.target_modules),
         "lora.target_modules is empty: name the modules to adapt, e.g. [to_q, to_k, to_v, to_out.0]")

    need(m.max_sequence_length is None or m.max_sequence_length >= 1,
         f"model.max_sequence_length must be >= 1 or null, got {m.max_sequence_length}")

    need(bool(d.path.strip()), f"data.path is empty: give the parquet file/glob or the hub dataset id for source {d.source!r}")
    need(d.resolution >= 8 and d.resolution % 8 == 0, f"data.resolution must be a positive multiple of 8, got {d.resolution}")
    need(d.max_train_samples is None or d.max_train_samples >= 1, f"data.max_train_samples must be >= 1 or null, got {d.max_train_samples}")
    need(d.max_eval_samples is None or d.max_eval_samples >= 1, f"data.max_eval_samples must be >= 1 or null, got {d.max_eval_samples}")
    need(not (d.eval_split and d.source != "hub"), f"data.eval_split applies to source hub; for source {d.source!r} set data.eval_path")
    need(d.num_workers is None or d.num_workers >= 0, f"data.num_workers must be >= 0 or null (automatic), got {d.num_workers}")
    need(d.prefetch_factor >= 1, f"data.prefetch_factor must be >= 1, got {d.prefetch_factor}")
    if d.latent_cache:
        from deradiff.training.cache import cache_problems

        e.extend(cache_problems(recipe))
    if d.reference_errors != "off":
        need(bool(d.reference_errors.strip()), "data.reference_errors is empty: use on, off or a folder path")
        need(bool(d.latent_cache), "data.reference_errors stores errors of the latent cache's draws: set "
             "data.latent_cache=DIR (made by `deradiff cache`) or data.reference_errors=off")

    if me.beta is None:
        e.append("method.beta is required: set it in the recipe or pass method.beta=... "
                 "(dpo, official convention: 2000 for SD1.5, 5000 for SDXL; diffusers convention: half that)")
    else:
        need(finite(me.beta) and me.beta > 0, f"method.beta must be a finite number > 0, got {me.beta}")
    # Sampling steps and guidance scales are checked whatever the method: a value that no
    # sampler accepts is a typo even where this method does not read it.
    need(me.num_steps >= 1, f"method.num_steps (sampling steps) must be >= 1, got {me.num_steps}")
    sampling = me.name in ("kl_grad", "kl_pg")
    low = 1 if sampling else 0  # the rollouts mix uncond + g x (cond - uncond): g < 1 is not guidance
    need(finite(me.guidance_scale) and me.guidance_scale >= low,
         f"method.guidance_scale must be a number >= {low}" + (" (1 = no guidance)" if sampling else "")
         + f", got {me.guidance_scale}")
    if sampling:
        need(bool(me.reward.strip()), "method.reward is empty: name a reward from the registry, e.g. toy")
        if m.kind in FLOW_KINDS:
            need(finite(me.noise_level) and me.noise_level > 0,
                 f"method.noise_level must be a finite number > 0, got {me.noise_level}: the per-step KL needs the "
                 "stochastic flow sampler (Flow-GRPO: 0.7)")
        else:
            need(finite(me.eta) and 0 < me.eta <= 1,
                 f"method.eta must be in (0, 1], got {me.eta}: the per-step KL needs a stochastic sampler (1.0 = DDPM)")
    need(finite(me.logit_mean), f"method.logit_mean must be a finite number, got {me.logit_mean}")
    need(finite(me.logit_std) and me.logit_std > 0, f"method.logit_std must be > 0, got {me.logit_std}")
    if m.drop_text_encoders:
        need(sampling, f"model.drop_text_encoders applies to kl_grad / kl_pg (a fixed prompt list); method {me.name} "
             "encodes every batch's captions: set model.drop_text_encoders=false")
        need(not s.prompts, "model.drop_text_encoders=true leaves no text encoder for the sample grids: set "
             "sample.prompts=[]")
    need(me.eval_draws >= 1, f"method.eval_draws must be >= 1, got {me.eval_draws}")
    if me.name == "kl_grad" and me.num_steps >= 1:
        need(1 <= me.truncation_steps <= me.num_steps,
             f"method.truncation_steps must be in [1, method.num_steps={me.num_steps}], got {me.truncation_steps}")
    if me.name == "kl_pg":
        need(me.samples_per_prompt >= 2, f"method.samples_per_prompt must be >= 2 for per-prompt advantages, got {me.samples_per_prompt}")
        need(me.samples_per_prompt < 2 or t.per_device_batch_size % me.samples_per_prompt == 0,
             f"trainer.per_device_batch_size ({t.per_device_batch_size}) must be a multiple of "
             f"method.samples_per_prompt ({me.samples_per_prompt})")
        need(finite(me.clip_range) and me.clip_range > 0, f"method.clip_range must be > 0, got {me.clip_range}")
        need(finite(me.adv_clip_max) and me.adv_clip_max > 0, f"method.adv_clip_max must be > 0, got {me.adv_clip_max}")
        need(me.num_inner_epochs >= 1, f"method.num_inner_epochs must be >= 1, got {me.num_inner_epochs}")

    need(bool(t.output_dir.strip()), "trainer.output_dir is empty: name the run directory, e.g. runs/toy-dpo")
    need(t.max_steps >= 1, f"trainer.max_steps must be >= 1, got {t.max_steps}")
    need(t.per_device_batch_size >= 1, f"trainer.per_device_batch_size must be >= 1, got {t.per_device_batch_size}")
    need(t.gradient_accumulation >= 1, f"trainer.gradient_accumulation must be >= 1, got {t.gradient_accumulation}")
    need(finite(t.lr) and 0 < t.lr < 1, f"trainer.lr must be in (0, 1), got {t.lr}")
    need(0 <= t.warmup_steps <= t.max_steps, f"trainer.warmup_steps must be in [0, trainer.max_steps={t.max_steps}], got {t.warmup_steps}")
    need(finite(t.weight_decay) and t.weight_decay >= 0, f"trainer.weight_decay must be >= 0, got {t.weight_decay}")
    need(finite(t.max_grad_norm) and t.max_grad_norm >= 0, f"trainer.max_grad_norm must be >= 0 (0 = no clipping), got {t.max_grad_norm}")
    for name in ("log_every", "checkpoint_every", "keep_checkpoints"):
        need(getattr(t, name) >= 1, f"trainer.{name} must be >= 1, got {getattr(t, name)}")
    for name in ("eval_every", "sample_every"):
        need(getattr(t, name) >= 0, f"trainer.{name} must be >= 0 (0 = never), got {getattr(t, name)}")

    flow_sampler = s.scheduler.startswith("flow_")
    need(not s.prompts or flow_sampler == (m.kind in FLOW_KINDS),
         f"sample.scheduler={s.scheduler} does not fit model.kind={m.kind}: use "
         + ("flow_euler or flow_sde" if m.kind in FLOW_KINDS else "a diffusion sampler such as ddim"))
    need(s.images_per_prompt >= 1, f"sample.images_per_prompt must be >= 1, got {s.images_per_prompt}")
    need(s.num_inference_steps >= 1, f"sample.num_inference_steps must be >= 1, got {s.num_inference_steps}")
    need(finite(s.guidance_scale) and s.guidance_scale >= 0, f"sample.guidance_scale must be a number >= 0, got {s.guidance_scale}")

    lams = recipe.sweep.lambdas
    need(all(finite(x) and x > 0 for x in lams), f"sweep.lambdas must all be > 0, got {lams}")
    need(len(set(lams)) == len(lams), f"sweep.lambdas has duplicates: {lams}")
    idx = recipe.sweep.index
    need(idx is None or 0 <= idx < len(lams), f"sweep.index must be in [0, {len(lams)}) (one per sweep.lambdas) or null, got {idx}")
    return e


def validate(recipe: Recipe) -> None:
    """Raise one UserError listing every problem of `recipe` (see `validation_errors`)."""
    errors = validation_errors(recipe)
    if errors:
        raise UserError(_format_errors(errors))


def recipe_warnings(recipe: Recipe) -> list[str]:
    """Legal but suspicious settings, to print at the start of a run."""
    w: list[str] = []
    if recipe.model.kind == "sdxl" and recipe.model.mixed_precision == "fp16" and not recipe.model.vae_name_or_path:
        w.append("SDXL in fp16 with its own VAE can overflow to NaN; set model.vae_name_or_path=madebyollin/sdxl-vae-fp16-fix")
    flow = recipe.model.kind in FLOW_KINDS
    if recipe.method.name in ("kl_grad", "kl_pg") and flow and recipe.method.noise_level < math.sqrt(2):
        w.append(f"method.noise_level={recipe.method.noise_level} is below the memoryless sqrt(2): the KL-regularized "
                 "optimum is then only approximately p_ref * exp(r / beta)")
    if recipe.method.name in ("kl_grad", "kl_pg") and not flow and recipe.method.eta < 1:
        w.append(f"method.eta={recipe.method.eta} is not the memoryless (DDPM, eta=1) schedule: the KL-regularized "
                 "optimum is then only approximately p_ref * exp(r / beta)")
    return w


def preflight(recipe: Recipe, check_cache: bool = True) -> None:
    """Checks of the machine and the files a recipe names (cheap; run before loading models).

    Prints `recipe_warnings` to stderr (on the first process only), then raises UserError for:
    missing or non-parquet data files, files lacking the Pick-a-Pic columns, missing prompt
    files, an unknown reward or sampler name, a non-differentiable reward for kl_grad, adamw8bit
    without bitsandbytes, fp16 without a CUDA device, trainer.compile on a CPU without a C++ compiler,
    a data.latent_cache that is missing or made for another recipe (deradiff.training.cache;
    check_cache=False for `deradiff cache`, which makes it).
    """
    from deradiff.models import SCHEDULERS

    if int(os.environ.get("RANK", "0")) == 0:  # launched processes share one terminal
        for warning in recipe_warnings(recipe):
            print(f"warning: {warning}", file=sys.stderr)
    e: list[str] = _pair_file_problems(recipe)
    d = recipe.data
    if recipe.method.name in ("kl_grad", "kl_pg"):
        try:
            prompt_spec(recipe)
        except UserError as err:
            e.append(str(err))
    for key in ("prompts", "eval_prompts"):
        spec = getattr(d, key)
        if spec and not _named_prompt_set(spec) and not Path(spec).is_file():
            e.append(f"data.{key} {spec!r} is not a file (use a text file, a prompt set such as 'toy:train', "
                     "or 'hf:<dataset id>')")
    if recipe.method.name in ("kl_grad", "kl_pg"):
        from deradiff.rewards import is_differentiable

        try:
            if recipe.method.name == "kl_grad" and not is_differentiable(recipe.method.reward):
                e.append(f"method.reward {recipe.method.reward!r} is not differentiable: use method.name=kl_pg")
        except UserError as err:
            e.append(f"method.reward: {err}")
    if recipe.sample.scheduler not in SCHEDULERS:
        e.append(f"sample.scheduler {recipe.sample.scheduler!r} is unknown; choose from {', '.join(sorted(SCHEDULERS))}")
    if recipe.trainer.optimizer == "adamw8bit" and importlib.util.find_spec("bitsandbytes") is None:
        e.append("trainer.optimizer=adamw8bit needs bitsandbytes: pip install bitsandbytes (or trainer.optimizer=adamw)")
    if recipe.model.mixed_precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            e.append("model.mixed_precision=fp16 needs a CUDA device; use bf16 or no on this machine")
    if check_cache and d.latent_cache and not e:  # the data files are there: is the cache made for this recipe?
        from deradiff.training.cache import open_cache

        try:
            open_cache(recipe)
        except UserError as err:
            e.append(str(err))
    if recipe.trainer.compile:
        import shutil

        import torch

        if not torch.cuda.is_available() and not any(shutil.which(c) for c in ("c++", "g++", "clang++")):
            e.append("trainer.compile=true on CPU needs a C++ compiler (inductor builds C++ kernels): install "
                     "g++ or set trainer.compile=false")
    if e:
        raise UserError(_format_errors(e))


def prompt_spec(recipe: Recipe) -> str:
    """The prompt spec that kl_grad / kl_pg train on: data.prompts, or else the default prompt set
    the model's plug-in registers. UserError when there is neither."""
    if recipe.data.prompts:
        return recipe.data.prompts
    from deradiff.plugins import model_entry

    entry = model_entry(recipe.model.name_or_path)
    if entry is not None and entry.default_prompts:
        return entry.default_prompts
    raise UserError(f"method {recipe.method.name} samples from prompts and model {recipe.model.name_or_path!r} "
                    "registers no default set: set data.prompts (a text file, a prompt set such as 'toy:train', "
                    "or 'hf:<dataset id>')")


def _named_prompt_set(spec: str) -> bool:
    """Whether deradiff.prompts.load_prompts reads `spec` as a named set (registered, hub or
    hf:<dataset>) rather than as a text file."""
    from deradiff.plugins import prompt_set_entry
    from deradiff.prompts import HUB_SETS

    name = spec.partition(":")[0]
    return prompt_set_entry(name) is not None or name in HUB_SETS or name in ("hf", "hpsv2")


def _pair_file_problems(recipe: Recipe) -> list[str]:
    """dpo on local parquet: data.path and data.eval_path name parquet files with the Pick-a-Pic
    columns (a CSV or a missing file fails here, not after hours in a queue)."""
    d = recipe.data
    if recipe.method.name != "dpo" or d.source == "hub":
        return []
    from deradiff.training.data import parquet_files, parquet_schema_problem

    hint = prefs_hint(recipe)
    problems = []
    for key, path, fix in (("data.path", d.path, ""), ("data.eval_path", d.eval_path, "; or set data.eval_path=null")):
        if not path:
            continue
        files = parquet_files(path)
        problem = parquet_schema_problem(files, key) if files else \
            f"{key} {path!r} matches no parquet file{f' ({hint})' if hint else ''}{fix}"
        if problem is not None:
            problems.append(problem)
    return problems


def prefs_hint(recipe: Recipe) -> str:
    """How to make preference pairs for the recipe's model, if a plug-in registered one."""
    from deradiff.plugins import model_entry

    entry = model_entry(recipe.model.name_or_path)
    return (entry.prefs_hint or "") if entry is not None else ""


# -- saving, comparing, sweeping ----------------------------------------------------------------


def recipe_to_dict(recipe: Recipe) -> dict:
    return dataclasses.asdict(recipe)


def recipe_to_yaml(recipe: Recipe) -> str:
    """The full recipe as YAML (every key, defaults included); `load_recipe` reads it back."""
    from omegaconf import OmegaConf

    return OmegaConf.to_yaml(OmegaConf.structured(recipe))


def save_resolved(recipe: Recipe, run_dir: str | os.PathLike) -> Path:
    """Write run_dir/recipe.yaml atomically (deradiff.io) and return its path."""
    from deradiff.io import write_text_atomic

    target = Path(run_dir) / RECIPE_FILE
    text = (
        "# Resolved recipe of this run (defaults <- recipe file <- overrides). Reproduce with:\n"
        f"#   accelerate launch train/align.py recipe={target}\n" + recipe_to_yaml(recipe)
    )
    return write_text_atomic(target, text)


def load_resolved(run_dir: str | os.PathLike) -> Recipe | None:
    """The recipe saved in a run directory, or None when there is none."""
    path = Path(run_dir) / RECIPE_FILE
    if not path.is_file():
        return None
    try:
        return load_recipe(path)
    except UserError as err:
        raise UserError(f"the saved recipe of run {run_dir} does not load with this version: {err}") from None


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def diff_recipes(a: Recipe, b: Recipe, ignore: Iterable[str] = ()) -> list[str]:
    """Keys whose values differ, as "key: a_value -> b_value", sorted.

    ignore: keys, or section names (e.g. "sample") to skip entirely.
    """
    skip = tuple(ignore)
    fa, fb = _flat(recipe_to_dict(a)), _flat(recipe_to_dict(b))
    return [
        f"{k}: {fa[k]!r} -> {fb[k]!r}"
        for k in sorted(fa)
        if fa[k] != fb[k] and not any(k == s or k.startswith(s + ".") for s in skip)
    ]


def check_resume(recipe: Recipe, run_dir: str | os.PathLike) -> list[str]:
    """Compare `recipe` with the one saved in run_dir; return the differences.

    Raises UserError when the run directory holds a different recipe (beyond RESUME_SAFE_KEYS)
    and trainer.resume is not "force". Returns [] for a new run directory.
    """
    saved = load_resolved(run_dir)
    if saved is None:
        return []
    diff = diff_recipes(saved, recipe, ignore=RESUME_SAFE_KEYS)
    if diff and recipe.trainer.resume != "force":
        raise UserError(
            f"{run_dir} holds a run of a different recipe (saved -> now): " + "; ".join(diff)
            + ". Choose another trainer.output_dir, or pass trainer.resume=force to resume anyway"
        )
    return diff


def sweep_recipes(recipe: Recipe) -> list[tuple[float, Recipe]]:
    """(lambda, recipe) per sweep point: method.beta = beta / lambda, output_dir/lambda-<lambda>.

    lambda > 1 is a weaker KL leash (smaller beta); realigning the base run at lambda emulates
    the run at beta / lambda, which is what these baselines are trained to check. With
    sweep.index set, only that point. Each returned recipe has an empty sweep (one run).
    """
    if recipe.method.beta is None:
        raise UserError("method.beta is required to derive the sweep's betas")
    out = []
    lambdas = recipe.sweep.lambdas
    if recipe.sweep.index is not None:
        lambdas = [lambdas[recipe.sweep.index]]
    for lam in lambdas:
        r = copy.deepcopy(recipe)
        r.method.beta = recipe.method.beta / lam
        r.trainer.output_dir = str(Path(recipe.trainer.output_dir) / f"lambda-{lam:g}")
        r.sweep.lambdas, r.sweep.index = [], None
        out.append((lam, r))
    return out
