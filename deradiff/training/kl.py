"""KL-regularized reward fine-tuning, both families, each with the exact per-step Gaussian KL.

Objective (docs/method.md section 4): maximize E[r(x_0)] - beta * KL(p_theta(path) || p_ref(path)),
where the path KL is the sum over sampling steps of ||mu_theta - mu_ref||^2 / (2 sigma_t^2)
(nats). Rollouts (`deradiff.training.rollout`) use stochastic DDIM for UNet families (eta = 1 is
DDPM's posterior variance, the memoryless schedule) and deradiff.flow.FlowMatchSDEScheduler for
flow families (SD3, FLUX; Flow-GRPO's SDE at method.noise_level, whose per-step KL is exact too:
the Flow-GRPO style policy gradient is kl_pg on those log-probabilities with per-prompt group
advantages). The reference is the same denoiser with its LoRA disabled. What differs per model
family (prompt encoding, the denoiser call, the sampling schedule) comes from
deradiff.training.families, keyed by model.kind.

kl_grad -- reward gradient, DRaFT-K (Clark et al., 2024). `kl_grad_loss`:
    loss = -mean_b [ r(decode(x_0)) - beta * KL_hat ]
  The reward's gradient flows through the VAE decoder and the last K = truncation_steps
  sampling steps. KL_hat = (exact KL of the last K steps, differentiated through the same K-step
  chain) + (N - K) / m * (KL of m earlier steps chosen uniformly without replacement, keyed by
  (seed, step), re-evaluated with gradient at their stored states). Its value is an unbiased
  estimate of the path KL, and its gradient an unbiased estimate of the fixed-state KL gradient
  of the earlier steps, truncated like the reward's (no gradient through x_t of earlier steps).
  m = min(K, N - K) by default: the earlier steps cost at most as much as the window. m = N - K
  makes it exact (N - K extra forward+backward passes per batch).

kl_pg -- policy gradient, DDPO's PPO (Black et al., 2024) plus the KL penalty. `kl_pg_loss`:
    loss = sum_t mean_b max(-A_b rho_bt, -A_b clip(rho_bt, 1 +- eps)) + beta * sum_t mean_b KL_bt / D
  rho_bt = exp(log p_theta(x_{t-1} | x_t) - log p_old), re-evaluated with gradient at the stored
  transitions; A = rewards normalized per prompt (the samples_per_prompt images of one prompt)
  and clamped to adv_clip_max; KL_bt the exact per-step KL at the stored x_t, with gradient.
  D = 1 for log_prob "sum"; D = the latent size for "mean" (DDPO's per-dimension log-probs), so
  the KL is reduced like the log-probabilities and both terms keep their relative weight:
  per prompt the objective is E[A] - beta * KL, i.e. beta is measured in units of the prompt's
  reward std (advantages are std-normalized), unlike kl_grad's beta, which is in reward units.
  All N timesteps enter the one loss (DDPO's timestep_fraction = 1); `kl_pg_loss` can take a
  keyed subset of n timesteps, scaled by N / n (unbiased), to bound memory at SD scale.

Batches. Dataset rows are prompts for both methods; the trainer hands each process
per_device_batch_size prompts per micro-batch. kl_grad samples one image per prompt; kl_pg
samples samples_per_prompt images per prompt (per_device_batch_size x samples_per_prompt
images), so every prompt's group lives on one process and its advantages need no gather.
Noise is keyed by (seed, rollout step, image id), image id = row (kl_grad) or
row * samples_per_prompt + j (kl_pg), so it does not depend on the process split.

num_inner_epochs = k > 1 (kl_pg): the rollouts sampled at step s (s % k == 0) are reused by
the optimizer steps s..s+k-1 (PPO's off-policy epochs, where clipping matters; with k = 1 the
ratio is exactly 1 and the step is REINFORCE). The rows the trainer assigns to the reuse steps
are not sampled, so an epoch of the data order samples 1/k of the prompts. For exact resume
the rollouts are also written (safetensors, atomically) to run_dir/rollouts/rank-R/, and a
rollout is kept while a checkpoint inside its reuse window exists.

Evaluation (both methods, when data.eval_prompts is set): EVAL_IMAGES_PER_PROMPT images per
held-out prompt with the same noise at every evaluation; logs eval/kl/reward, eval/kl/path_kl
and eval/kl/objective, the cleanest trend to read (the training metrics see new noise and new
prompts at every step).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from deradiff.errors import UserError
from deradiff.flow import FlowMatchSDEScheduler
from deradiff.io import atomic_write
from deradiff.seeding import SALT_KL_STEPS, SALT_PG_TIMESTEPS, keyed_randn
from deradiff.training.conditioning import Conditioning, PromptCache, drop_text_encoders, encode_prompts
from deradiff.training.families import check_family, get_family
from deradiff.training.losses import kl_regularized_reward_loss, normalize_advantages_per_prompt, ppo_loss
from deradiff.training.rollout import (
    RolloutSpec,
    Trajectory,
    sample_trajectory,
    set_sampling_timesteps,
    step_log_prob_and_kl,
)


def keyed_subset(n: int, k: int, seed: int, step: int, salt: int) -> list[int]:
    """k distinct indices of range(n), uniformly at random, a pure function of (seed, step, salt);
    the same on every process and accumulation micro-batch. Sorted."""
    if not 0 <= k <= n:
        raise ValueError(f"cannot choose {k} of {n}")
    order = torch.argsort(keyed_randn((n,), [0], seed, step, salt=salt)[0]) if n else torch.zeros(0, dtype=torch.long)
    return sorted(order[:k].tolist())


def default_kl_sample_steps(num_steps: int, truncation_steps: int) -> int:
    """m = min(K, N - K) earlier steps re-evaluated for the KL gradient (see module docstring)."""
    return min(truncation_steps, num_steps - truncation_steps)


# -- kl_grad ---------------------------------------------------------------------------------------


def kl_grad_loss(
    unet,
    reference_unet,
    spec: RolloutSpec,
    prompts: list[str],
    cond: Conditioning,
    uncond: Conditioning | None,
    sample_ids: list[int],
    step: int,
    truncation_steps: int,
    beta: float,
    kl_sample_steps: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DRaFT-K loss for B = len(prompts) samples, one per prompt.

    Args:
        unet: the trainable UNet (LoRA enabled; accelerate-wrapped is fine).
        reference_unet: the plain module; run with adapters disabled, without gradients.
        spec: the rollouts' scheduler (mutated: set_timesteps), sampling settings, VAE and reward
            (differentiable: (images (B, 3, H, W) in [-1, 1], prompts) -> (B,)).
        sample_ids: B keys of the initial and per-step noise.
        truncation_steps: K, the final sampling steps the gradients flow through.
        kl_sample_steps: m earlier steps re-evaluated for the KL gradient; None = min(K, N - K).
    Returns the loss and metrics kl/reward, kl/reward_std, kl/path_kl (exact path KL of the
    sampled paths, detached), kl/objective (reward - beta * path_kl), kl/loss.
    """
    n, k = spec.num_steps, truncation_steps
    if not 1 <= k <= n:
        raise ValueError(f"truncation_steps must be in [1, {n}], got {k}")
    m = default_kl_sample_steps(n, k) if kl_sample_steps is None else kl_sample_steps
    traj = sample_trajectory(unet, reference_unet, spec, cond, uncond, sample_ids, step, grad_steps=k)
    kl_hat = traj.kl_grad
    if m > 0:
        for index in keyed_subset(n - k, m, spec.seed, step, SALT_KL_STEPS):
            _, kl = step_log_prob_and_kl(unet, reference_unet, spec, traj, index, cond, uncond)
            kl_hat = kl_hat + kl * ((n - k) / m)
    reward = spec.score(traj.x0, prompts)
    loss, metrics = kl_regularized_reward_loss(reward, kl_hat, beta)
    path_kl = traj.path_kl.float()
    metrics["kl/path_kl"] = float(path_kl.mean())
    metrics["kl/objective"] = float((reward.detach() - beta * path_kl).mean())
    return loss, metrics


# -- kl_pg -----------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """A kl_pg rollout batch of n images over N steps (all detached).

    prompts, prompt_ids: (n,) prompt and dataset row of each image (the samples of one prompt
    are consecutive); latents (N + 1, n, C, h, w); timesteps (N,); sigmas (N,); log_probs (N, n)
    exact (sum) per-step log-probabilities under the sampling policy; kls (N, n) per-step KL;
    rewards (n,); advantages (n,) per-prompt normalized, not clamped.
    """

    prompts: list[str]
    prompt_ids: list[int]
    latents: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor
    log_probs: torch.Tensor
    kls: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor

    _TENSORS = ("latents", "timesteps", "sigmas", "log_probs", "kls", "rewards", "advantages")

    def trajectory(self) -> Trajectory:
        return Trajectory(self.latents, self.timesteps, self.sigmas, self.log_probs, self.kls, self.latents[-1],
                          torch.zeros(self.latents.shape[1], device=self.latents.device))

    def save(self, path: Path) -> None:
        """Write as safetensors (prompts in the metadata), atomically (deradiff.io)."""
        from safetensors.torch import save

        data = save({k: getattr(self, k).detach().cpu().contiguous() for k in self._TENSORS},
                    metadata={"prompts": json.dumps(self.prompts), "prompt_ids": json.dumps(self.prompt_ids)})
        with atomic_write(path, "wb") as f:
            f.write(data)

    @classmethod
    def load(cls, path: Path, device) -> Rollout:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata()
            tensors = {k: f.get_tensor(k).to(device) for k in cls._TENSORS}
        return cls(json.loads(meta["prompts"]), json.loads(meta["prompt_ids"]), **tensors)


@torch.no_grad()
def sample_rollout(
    unet,
    reference_unet,
    spec: RolloutSpec,
    prompts: list[str],
    prompt_ids: list[int],
    cond: Conditioning,
    uncond: Conditioning | None,
    step: int,
    samples_per_prompt: int,
) -> Rollout:
    """Sample samples_per_prompt images for each of the P prompts, score them, and normalize the
    rewards per prompt. cond/uncond: conditioning of the P prompts (repeated here).
    Image j of prompt row i has noise key i * samples_per_prompt + j."""
    s = samples_per_prompt
    image_prompts = [p for p in prompts for _ in range(s)]
    image_rows = [i for i in prompt_ids for _ in range(s)]
    keys = [i * s + j for i in prompt_ids for j in range(s)]
    cond_s, uncond_s = cond.repeat_each(s), (None if uncond is None else uncond.repeat_each(s))
    traj = sample_trajectory(unet, reference_unet, spec, cond_s, uncond_s, keys, step)
    rewards = spec.score(traj.x0, image_prompts)
    advantages = normalize_advantages_per_prompt(rewards, image_rows)
    return Rollout(image_prompts, image_rows, traj.latents, traj.timesteps, traj.sigmas, traj.log_probs, traj.kls,
                   rewards, advantages)


def kl_pg_loss(
    unet,
    reference_unet,
    spec: RolloutSpec,
    batch: Rollout,
    cond: Conditioning,
    uncond: Conditioning | None,
    beta: float,
    clip_range: float,
    adv_clip_max: float,
    log_prob: str = "mean",
    step: int = 0,
    num_timesteps: int | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO + beta x KL over the stored transitions of a rollout batch (see module docstring).

    cond/uncond: conditioning of the n images (one row per image). num_timesteps: train on a
    keyed subset of this many of the N timesteps (scaled by N / num_timesteps); None = all.
    Returns the loss and metrics kl/loss, kl/reward, kl/path_kl (of the rollout), kl/objective,
    pg/loss, pg/kl_term, pg/clipfrac, pg/approx_kl, pg/ratio, pg/advantage_std.
    """
    if log_prob not in ("mean", "sum"):
        raise ValueError(f"log_prob must be 'mean' or 'sum', got {log_prob!r}")
    if num_timesteps is not None and num_timesteps < 1:
        raise ValueError(f"num_timesteps must be >= 1 or None, got {num_timesteps}")
    traj = batch.trajectory()
    n_steps = traj.timesteps.shape[0]
    dims = traj.latents[0, 0].numel() if log_prob == "mean" else 1
    chosen = list(range(n_steps)) if num_timesteps is None else \
        keyed_subset(n_steps, num_timesteps, spec.seed, step, SALT_PG_TIMESTEPS)
    scale = n_steps / len(chosen)
    set_sampling_timesteps(spec.scheduler, n_steps, tuple(traj.latents.shape[-3:]), cond.family)
    pg = kl_term = 0.0
    per_step: list[dict[str, float]] = []
    for index in chosen:
        lp, kl = step_log_prob_and_kl(unet, reference_unet, spec, traj, index, cond, uncond)
        step_pg, m = ppo_loss(lp / dims, traj.log_probs[index].float() / dims, batch.advantages, clip_range,
                              adv_clip_max)
        pg = pg + step_pg * scale
        kl_term = kl_term + (kl / dims).mean() * scale
        per_step.append(m)
    loss = pg + beta * kl_term
    path_kl = batch.kls.float().sum(0)
    rewards = batch.rewards.float()
    metrics = {
        "kl/loss": float(loss.detach()),
        "kl/reward": float(rewards.mean()),
        "kl/path_kl": float(path_kl.mean()),
        "kl/objective": float((rewards - beta * path_kl).mean()),
        "pg/loss": float(pg.detach()),
        "pg/kl_term": float(kl_term.detach()),
        "pg/advantage_std": float(batch.advantages.float().std(unbiased=False)),
    }
    for ours, theirs in (("pg/clipfrac", "ppo/clipfrac"), ("pg/approx_kl", "ppo/approx_kl"), ("pg/ratio", "ppo/ratio")):
        metrics[ours] = sum(m[theirs] for m in per_step) / len(per_step)
    return loss, metrics


class RolloutStore:
    """kl_pg rollouts reused for `inner_epochs` optimizer steps: in memory, and on disk under
    root/rollouts/rank-R/ (when root is given and inner_epochs > 1) so a resumed run finds them.

    A rollout sampled at step s serves steps s..s+inner_epochs-1; files of older rollouts are
    deleted when a new one is written, unless a checkpoint lies inside their reuse window.
    """

    def __init__(self, root: str | os.PathLike | None, rank: int, inner_epochs: int):
        self.inner_epochs = inner_epochs
        self.root = Path(root) if root is not None else None
        self.dir = None if self.root is None or inner_epochs == 1 else self.root / "rollouts" / f"rank-{rank:03d}"
        self._memory: dict[tuple[int, int], Rollout] = {}

    def rollout_step(self, step: int) -> int:
        return step - step % self.inner_epochs

    def _path(self, step: int, micro: int) -> Path:
        return self.dir / f"step-{step:06d}-micro-{micro:03d}.safetensors"

    def get(self, step: int, micro: int, device) -> Rollout | None:
        key = (self.rollout_step(step), micro)
        if key not in self._memory and self.dir is not None and self._path(*key).exists():
            self._memory[key] = Rollout.load(self._path(*key), device)
        return self._memory.get(key)

    def put(self, step: int, micro: int, batch: Rollout) -> None:
        if step % self.inner_epochs:
            raise ValueError(f"rollouts are sampled at multiples of {self.inner_epochs}, not at step {step}")
        self._memory = {k: v for k, v in self._memory.items() if k[0] == step}
        self._memory[(step, micro)] = batch
        if self.dir is None:
            return
        batch.save(self._path(step, micro))
        self._prune(step)

    def _prune(self, current: int) -> None:
        from deradiff.training.checkpoint import checkpoint_dirs

        checkpoints = [int(p.name.split("-")[1]) for p in checkpoint_dirs(self.root)]
        for path in self.dir.glob("step-*-micro-*.safetensors"):
            start = int(path.name.split("-")[1])
            needed = any(start < c < start + self.inner_epochs for c in checkpoints)
            if start < current and not needed:
                path.unlink(missing_ok=True)


# -- Method factories ------------------------------------------------------------------------------


def training_prompts(recipe) -> list[str]:
    """The training prompts: data.prompts, or the model's registered default set (see
    deradiff.training.recipe_checks.prompt_spec), read by deradiff.prompts.load_prompts."""
    from deradiff.prompts import load_prompts
    from deradiff.training.recipe_checks import prompt_spec

    return load_prompts(prompt_spec(recipe))


def _rollout_parts(recipe, pipe, accelerator):
    """Shared setup: prompt rows, the RolloutSpec (the rollouts' own scheduler, latent shape,
    sampling settings, VAE and reward), the prompt encoder. The family is checked against the
    pipeline: flow families (sd3, flux) sample with FlowMatchSDEScheduler at method.noise_level,
    UNet families with DDIM at method.eta."""
    from diffusers import DDIMScheduler

    from deradiff.rewards import get_reward

    m = recipe.method
    family = check_family(recipe.model.kind, pipe)
    prompts = training_prompts(recipe)
    # A scheduler of our own: set_timesteps must not disturb the pipeline's (used for sample grids).
    if family.flow:
        scheduler = FlowMatchSDEScheduler.from_config(pipe.scheduler.config, noise_level=m.noise_level)
    else:
        scheduler = DDIMScheduler.from_config({**pipe.scheduler.config, "clip_sample": False})
    side = recipe.data.resolution // pipe.vae_scale_factor
    if family.flow and side % 2:
        raise UserError(f"data.resolution={recipe.data.resolution} gives {side}x{side} latents; {family.name} "
                        f"needs an even latent side (2x2 patches): use a multiple of {2 * pipe.vae_scale_factor}")
    reward = get_reward(m.reward).to(accelerator.device)
    spec = RolloutSpec(scheduler, (family.latent_channels(pipe), side, side), m.num_steps, m.eta, m.guidance_scale,
                       recipe.trainer.seed, vae=pipe.vae, reward_fn=reward.score)
    dataset = [{"prompt": p} for p in prompts]
    encoder = RolloutPrompts(recipe, pipe, accelerator, prompts)
    return dataset, spec, encoder


def _collate(rows: list[dict], ids: list[int]) -> dict:
    return {"prompts": [r["prompt"] for r in rows], "ids": list(ids)}


class RolloutPrompts:
    """prompts -> (cond, uncond) of the rollouts: uncond ("") only where the family batches
    classifier-free guidance (sd15, sdxl, sd3) and method.guidance_scale > 1; FLUX.1-dev gets the
    scale as its guidance input. With model.drop_text_encoders, every training and evaluation
    prompt (and "") is encoded once here (a PromptCache on the CPU) and the text encoders are
    deleted from the pipeline."""

    def __init__(self, recipe, pipe, accelerator, prompts: list[str]):
        m = recipe.method
        self.pipe, self.device = pipe, accelerator.device
        self.kwargs = {"resolution": recipe.data.resolution, "guidance": m.guidance_scale,
                       "max_sequence_length": recipe.model.max_sequence_length}
        self.cfg = get_family(recipe.model.kind).cfg and m.guidance_scale > 1
        self.cache = None
        if recipe.model.drop_text_encoders:
            from deradiff.prompts import load_prompts

            needed = [*prompts, *(load_prompts(recipe.data.eval_prompts) if recipe.data.eval_prompts else []), ""]
            self.cache = PromptCache(pipe, needed, self.device, **self.kwargs)
            freed = drop_text_encoders(pipe)
            accelerator.print(f"text embeddings of {len(self.cache.index)} prompts kept on the CPU "
                              f"({self.cache.nbytes / 2**20:.1f} MiB); text encoders dropped ({freed / 1e6:.1f}M params)")

    def encode(self, prompts: list[str]) -> Conditioning:
        if self.cache is not None:
            return self.cache.encode(prompts, self.device)
        return encode_prompts(self.pipe, prompts, self.device, **self.kwargs)

    def __call__(self, prompts: list[str]) -> tuple[Conditioning, Conditioning | None]:
        return self.encode(prompts), (self.encode([""] * len(prompts)) if self.cfg else None)


def sampler_description(recipe) -> str:
    """The rollout sampler in words, for the start-of-run log."""
    m = recipe.method
    if get_family(recipe.model.kind).flow:
        guidance = "guidance input" if recipe.model.kind == "flux" else "guidance"
        return f"{m.num_steps} flow SDE steps (noise_level={m.noise_level:g}, {guidance}={m.guidance_scale:g})"
    return f"{m.num_steps} DDIM steps (eta={m.eta:g}, guidance={m.guidance_scale:g})"


EVAL_IMAGES_PER_PROMPT = 4
_EVAL_STEP_KEY = -1  # noise key of evaluation rollouts: the same images at every evaluation


def _make_evaluate(recipe, accelerator, spec: RolloutSpec, encoder: RolloutPrompts):
    """evaluate(unet) -> eval/kl/{reward,path_kl,objective}: EVAL_IMAGES_PER_PROMPT images per
    data.eval_prompts prompt with fixed noise, this rank's share, averaged over ranks; None
    without eval prompts."""
    if not recipe.data.eval_prompts:
        return None
    from deradiff.prompts import load_prompts

    prompts = load_prompts(recipe.data.eval_prompts)
    per = EVAL_IMAGES_PER_PROMPT
    images = [(p, i * per + j) for i, p in enumerate(prompts) for j in range(per)]
    mine = images[accelerator.process_index::accelerator.num_processes]
    size = recipe.trainer.per_device_batch_size * (recipe.method.samples_per_prompt if recipe.method.name == "kl_pg" else 1)
    device = accelerator.device

    @torch.no_grad()
    def evaluate(unet) -> dict[str, float]:
        totals = torch.zeros(3, dtype=torch.float64, device=device)  # reward sum, path KL sum, count
        for start in range(0, len(mine), size):
            chunk = mine[start:start + size]
            chunk_prompts = [p for p, _ in chunk]
            cond, uncond = encoder(chunk_prompts)
            with accelerator.autocast():
                traj = sample_trajectory(unet, accelerator.unwrap_model(unet), spec, cond, uncond,
                                         [k for _, k in chunk], _EVAL_STEP_KEY)
                r = spec.score(traj.x0, chunk_prompts)
            totals += torch.stack([r.sum(), traj.path_kl.float().sum(), torch.tensor(float(len(chunk)))]).to(totals)
        if accelerator.num_processes > 1:
            totals = accelerator.reduce(totals, reduction="sum")
        reward_mean, kl_mean = float(totals[0] / totals[2]), float(totals[1] / totals[2])
        return {"eval/kl/reward": reward_mean, "eval/kl/path_kl": kl_mean,
                "eval/kl/objective": reward_mean - recipe.method.beta * kl_mean}

    return evaluate


def make_kl_grad(recipe, pipe, accelerator):
    """Method "kl_grad": DRaFT-K reward gradient + beta x per-step KL (differentiable rewards)."""
    from deradiff.rewards import is_differentiable
    from deradiff.training.trainer import Method

    m = recipe.method
    if not is_differentiable(m.reward):
        raise UserError(f"method.reward={m.reward!r} is not differentiable, and kl_grad backpropagates the reward: "
                        "use method.name=kl_pg (policy gradient, any reward) or a differentiable reward")
    dataset, spec, encoder = _rollout_parts(recipe, pipe, accelerator)
    k, n = m.truncation_steps, m.num_steps
    kl_m = default_kl_sample_steps(n, k)

    def step(unet, batch: dict, step_index: int, micro: int, epoch: int):
        cond, uncond = encoder(batch["prompts"])
        with accelerator.autocast():
            return kl_grad_loss(unet, accelerator.unwrap_model(unet), spec, batch["prompts"], cond, uncond,
                                batch["ids"], step_index, k, m.beta, kl_m)

    describe = (f"beta={m.beta:g} x path KL (nats), reward {m.reward!r} in its own units; DRaFT-{k} of "
                f"{sampler_description(recipe)}; KL gradient of the {n - k} earlier steps "
                f"from {kl_m} keyed random ones x {(n - k) / max(kl_m, 1):g}; 1 image per prompt")
    return Method("kl_grad", dataset, _collate, step, describe,
                  evaluate=_make_evaluate(recipe, accelerator, spec, encoder))


def make_kl_pg(recipe, pipe, accelerator):
    """Method "kl_pg": DDPO-style PPO + beta x per-step KL (any reward)."""
    from deradiff.training.trainer import Method

    m = recipe.method
    dataset, spec, encoder = _rollout_parts(recipe, pipe, accelerator)
    s = m.samples_per_prompt
    store = RolloutStore(accelerator.project_configuration.project_dir if m.num_inner_epochs > 1 else None,
                         accelerator.process_index, m.num_inner_epochs)
    device = accelerator.device

    def step(unet, batch: dict, step_index: int, micro: int, epoch: int):
        rollout_batch = store.get(step_index, micro, device)
        if rollout_batch is None:
            if step_index % m.num_inner_epochs:
                raise RuntimeError(f"kl_pg: no stored rollout for step {step_index} (sampled at step "
                                   f"{store.rollout_step(step_index)}); was the run directory's rollouts/ removed?")
            cond, uncond = encoder(batch["prompts"])
            was_training = unet.training
            unet.eval()  # sample as DDPO does: no LoRA dropout in the behaviour policy
            with accelerator.autocast():
                rollout_batch = sample_rollout(unet, accelerator.unwrap_model(unet), spec, batch["prompts"],
                                               batch["ids"], cond, uncond, step_index, s)
            unet.train(was_training)
            store.put(step_index, micro, rollout_batch)
        # Conditioning of the stored prompts (one row per image), not of this step's rows.
        cond, uncond = encoder(rollout_batch.prompts)
        with accelerator.autocast():
            return kl_pg_loss(unet, accelerator.unwrap_model(unet), spec, rollout_batch, cond, uncond, m.beta,
                              m.clip_range, m.adv_clip_max, m.log_prob, step_index)

    describe = (f"beta={m.beta:g} x per-step KL, in units of the per-prompt reward std (log_prob={m.log_prob}); "
                f"PPO clip {m.clip_range:g}, advantages clamped to {m.adv_clip_max:g}; {s} images per prompt "
                f"(per_device_batch_size counts prompts); {_schedule_desc(recipe)}; reward {m.reward!r}")
    return Method("kl_pg", dataset, _collate, step, describe,
                  evaluate=_make_evaluate(recipe, accelerator, spec, encoder))


def _schedule_desc(recipe) -> str:
    m = recipe.method
    reuse = f"each rollout reused for {m.num_inner_epochs} optimizer steps" if m.num_inner_epochs > 1 else \
        "on-policy (num_inner_epochs=1: the PPO ratio is 1, REINFORCE)"
    return f"{sampler_description(recipe)}, all in the loss; {reuse}"
