"""Training recipes: the typed sections of one run, each option's meaning and its default, declared once.

A recipe is resolved as defaults (declared once, in the dataclasses below) <- a YAML file
<- command-line overrides, the form `train/align.py recipe=recipes/toy-dpo.yaml trainer.lr=1e-4
method.beta=2500`. Every problem (unknown key, wrong type, value out of range, missing file) is
reported before any model is loaded, all problems at once, each naming the key and the fix:

    recipe = load_recipe(sys.argv[1:])      # recipe_load: parse_cli + load + validate
    preflight(recipe)                       # recipe_checks: the files, names and machine it needs
    save_resolved(recipe, run_dir)          # recipe_runs: run_dir/recipe.yaml, itself a loadable recipe
    check_resume(recipe, run_dir)           # recipe_runs: refuse to resume a run of a different recipe

The resolved recipe in a run directory is a complete recipe file: `recipe=RUN/recipe.yaml`
reproduces the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

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
        split_backward: dpo: run the trained forward and backward on one image of a
            micro-batch's 2 x per_device_batch_size (preferred, rejected) at a time, each
            image's LoRA gradient kept until the DPO loss weighs them
            (deradiff.training.dpo.model_errors_one_at_a_time): the same gradient to float
            rounding, the activations of one image instead of all, the same compute in smaller
            calls (slower where a batch fills a GPU better). Combines with
            gradient_checkpointing; not with fp16 (its per-image backward is not loss-scaled)
            nor with DeepSpeed ZeRO-3.
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
    split_backward: bool = False
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
            recipe differs (beyond recipe_runs.RESUME_SAFE_KEYS); "force": continue even if it differs;
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
            gradient_checkpointing, split_backward); attention is diffusers' SDPA processor by default.
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
            Empty = no sweep. See recipe_runs.sweep_recipes.
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
