"""Recipe checks: ranges and cross-field rules (`validate`), suspicious settings, and the
pre-flight of the files, names and machine a recipe needs, all before any model is loaded.

Each problem is a message naming the key and the fix; all of a recipe's problems are raised at
once, as one UserError (`format_errors`).
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

from deradiff.errors import UserError
from deradiff.prompts import names_a_set
from deradiff.training.recipe import FLOW_KINDS, Recipe


def format_errors(errors: list[str]) -> str:
    """One message for every problem: "recipe: PROBLEM", or a count and one "  - PROBLEM" line each."""
    if len(errors) == 1:
        return f"recipe: {errors[0]}"
    return f"recipe has {len(errors)} problems:\n" + "\n".join(f"  - {e}" for e in errors)


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
    if m.split_backward:
        need(me.name == "dpo", f"model.split_backward applies to dpo (one backward per preference image); method "
             f"{me.name} does not read it: set model.split_backward=false")
        need(m.mixed_precision != "fp16", "model.split_backward=true with model.mixed_precision=fp16: its per-image "
             "backward has no loss scaling; use bf16 or no")
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
        raise UserError(format_errors(errors))


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
        if spec and not names_a_set(spec) and not Path(spec).is_file():
            e.append(f"data.{key} {spec!r} is not a file (use a text file, a prompt set such as 'toy:train', "
                     "or 'hf:<dataset id>')")
    if recipe.method.name in ("kl_grad", "kl_pg"):
        from deradiff.rewards import is_differentiable, reward_weights

        try:
            reward_weights(recipe.method.reward)  # a name or "toy=1,toy_contrast=0.5", checked for either method
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
        raise UserError(format_errors(e))


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
