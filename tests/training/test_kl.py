"""KL-regularized reward fine-tuning (deradiff.training.kl) on a tiny SD1.5-shaped pipeline."""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import add_random_lora, build_tiny_sd15

from deradiff.errors import UserError
from deradiff.rewards import REWARDS, Reward, RewardEntry
from deradiff.seeding import SALT_KL_STEPS, SALT_PG_TIMESTEPS
from deradiff.training import kl
from deradiff.training.conditioning import encode_prompts
from deradiff.training.recipe import Recipe
from deradiff.training.rollout import RolloutSpec, sample_trajectory, step_log_prob_and_kl

PROMPTS = ["a red circle", "a blue square", "a green cross"]


class Brightness(Reward):
    """Planted differentiable reward: mean pixel value."""

    differentiable = True

    def score(self, images, prompts):
        return images.float().mean(dim=(1, 2, 3))


class Thresholded(Reward):
    """Planted non-differentiable reward: fraction of bright pixels."""

    differentiable = False

    def score(self, images, prompts):
        return (images.detach() > 0).float().mean(dim=(1, 2, 3))


class _Accelerator:
    """What the methods use of accelerate.Accelerator, for one CPU process."""

    device = torch.device("cpu")
    process_index = 0
    num_processes = 1

    def __init__(self, project_dir=None):
        self.project_configuration = SimpleNamespace(project_dir=project_dir)

    def unwrap_model(self, model):
        return model

    def autocast(self):
        return contextlib.nullcontext()

    def print(self, *args):
        print(*args)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """Frozen tiny pipeline with a random (nonzero) LoRA; tests restore the LoRA they change."""
    p = build_tiny_sd15(tmp_path_factory.mktemp("kl"))
    for module in (p.unet, p.vae, p.text_encoder):
        module.requires_grad_(False)
    add_random_lora(p.unet, strength=0.3)
    return p


@pytest.fixture
def lora(pipe):
    """The LoRA parameters; restored after the test."""
    params = {n: p for n, p in pipe.unet.named_parameters() if p.requires_grad}
    saved = {n: p.detach().clone() for n, p in params.items()}
    yield params
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(saved[n])
            p.grad = None


@pytest.fixture
def planted_rewards(monkeypatch):
    monkeypatch.setitem(REWARDS, "brightness", RewardEntry(__name__, "Brightness", True, "test"))
    monkeypatch.setitem(REWARDS, "thresholded", RewardEntry(__name__, "Thresholded", False, "test"))


def _cond(pipe, prompts):
    return encode_prompts(pipe, prompts, "cpu")


def _spec(pipe, reward_fn=None) -> RolloutSpec:
    return RolloutSpec(pipe.scheduler, latent_shape=(4, 8, 8), num_steps=4, eta=1.0, guidance=1.0, seed=0,
                       vae=pipe.vae, reward_fn=reward_fn or Brightness().score)


def _grad_loss(pipe, beta, step=0, truncation=1, kl_sample_steps=None, reward=None):
    return kl.kl_grad_loss(pipe.unet, pipe.unet, _spec(pipe, reward), PROMPTS[:2], _cond(pipe, PROMPTS[:2]), None,
                           [3, 4], step, truncation, beta, kl_sample_steps)


@torch.no_grad()
def _path_kl_and_reward(pipe, step=0):
    traj = sample_trajectory(pipe.unet, pipe.unet, _spec(pipe), _cond(pipe, PROMPTS[:2]), None, [3, 4], step)
    from deradiff.training.rollout import decode

    return traj, traj.path_kl.mean().item(), Brightness().score(decode(pipe.vae, traj.x0), PROMPTS[:2]).mean().item()


def _normalized_sgd_step(params, size):
    """p -= size * g / ||g|| over all params (a step of fixed length, no lr tuning)."""
    norm = torch.sqrt(sum(p.grad.square().sum() for p in params.values()))
    with torch.no_grad():
        for p in params.values():
            p -= size * p.grad / norm
            p.grad = None


def test_keyed_subset_is_keyed_distinct_and_uniform():
    assert kl.keyed_subset(7, 3, seed=0, step=5, salt=9) == kl.keyed_subset(7, 3, seed=0, step=5, salt=9)
    picks = [kl.keyed_subset(5, 2, seed=1, step=s, salt=9) for s in range(2000)]
    assert all(len(set(p)) == 2 for p in picks)
    counts = torch.bincount(torch.tensor(picks).flatten(), minlength=5).float() / 2000
    torch.testing.assert_close(counts, torch.full((5,), 0.4), atol=0.04, rtol=0)
    assert kl.keyed_subset(4, 0, 0, 0, 9) == [] and kl.default_kl_sample_steps(20, 1) == 1
    assert kl.default_kl_sample_steps(20, 15) == 5


@pytest.mark.parametrize("kl_sample_steps", [1, 3])
def test_kl_grad_loss_value_and_gradients_reach_only_the_lora(pipe, lora, kl_sample_steps):
    beta, step = 0.5, 2
    loss, metrics = _grad_loss(pipe, beta, step=step, kl_sample_steps=kl_sample_steps)
    traj, path_kl, reward = _path_kl_and_reward(pipe, step=step)
    # Value: reward - beta * (exact KL of the last step + (N-K)/m x KL of the chosen earlier steps).
    chosen = kl.keyed_subset(3, kl_sample_steps, 0, step, SALT_KL_STEPS)
    kl_hat = traj.kls[3] + traj.kls[chosen].sum(0) * (3 / kl_sample_steps)
    assert math.isclose(loss.item(), -(reward - beta * kl_hat.mean().item()), rel_tol=1e-4, abs_tol=1e-6)
    assert math.isclose(metrics["kl/path_kl"], path_kl, rel_tol=1e-4)
    assert math.isclose(metrics["kl/reward"], reward, rel_tol=1e-4, abs_tol=1e-6)
    assert math.isclose(metrics["kl/objective"], reward - beta * path_kl, rel_tol=1e-4, abs_tol=1e-6)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())
    frozen = [p for m in (pipe.unet, pipe.vae, pipe.text_encoder) for p in m.parameters() if not p.requires_grad]
    assert frozen and all(p.grad is None for p in frozen)


def test_huge_beta_step_lowers_the_path_kl_on_the_same_noise(pipe, lora):
    _, before, _ = _path_kl_and_reward(pipe)
    loss, _ = _grad_loss(pipe, beta=1e6)  # default m = min(K, N - K) = 1 of the 3 earlier steps
    loss.backward()
    _normalized_sgd_step(lora, 0.2)
    _, after, _ = _path_kl_and_reward(pipe)
    assert after < 0.85 * before, (before, after)


def test_zero_beta_step_raises_the_reward_on_the_same_noise(pipe, lora):
    _, _, before = _path_kl_and_reward(pipe)
    loss, _ = _grad_loss(pipe, beta=0.0)
    loss.backward()
    _normalized_sgd_step(lora, 0.5)
    _, _, after = _path_kl_and_reward(pipe)
    assert after > before + 1e-3, (before, after)


def _rollout(pipe, reward_fn, step=0, prompts=PROMPTS, ids=(0, 1, 2), s=2):
    return kl.sample_rollout(pipe.unet, pipe.unet, _spec(pipe, reward_fn), list(prompts), list(ids),
                             _cond(pipe, list(prompts)), None, step, s)


def test_rollout_advantages_are_normalized_per_prompt(pipe):
    offsets = {p: 10.0 * i for i, p in enumerate(PROMPTS)}

    def reward(images, prompts):  # prompt-dependent offsets a global normalization would keep
        return Brightness().score(images, prompts) + torch.tensor([offsets[p] for p in prompts])

    batch = _rollout(pipe, reward, s=3)
    assert batch.prompts == [p for p in PROMPTS for _ in range(3)] and batch.prompt_ids == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    groups = batch.advantages.view(3, 3)
    torch.testing.assert_close(groups.mean(1), torch.zeros(3), atol=1e-4, rtol=0)
    torch.testing.assert_close(groups.std(1, unbiased=False), torch.ones(3), atol=1e-3, rtol=0)
    assert batch.latents.shape == (5, 9, 4, 8, 8) and batch.log_probs.shape == (4, 9)


@pytest.mark.parametrize("log_prob", ["mean", "sum"])
def test_kl_pg_loss_equals_hand_computed_ppo_plus_kl(pipe, lora, log_prob):
    batch = _rollout(pipe, Brightness().score, ids=(0, 1, 2), s=2)
    dims = 4 * 8 * 8 if log_prob == "mean" else 1
    # Pretend the behaviour policy differed: per-dimension log-ratios of +-0.3 around the clip range 0.2.
    shift = torch.linspace(-0.3, 0.3, 6).repeat(4, 1) * dims
    batch.log_probs = batch.log_probs - shift
    batch.advantages = torch.tensor([1.5, -1.5, 8.0, -8.0, 0.5, -0.5])  # two beyond adv_clip_max
    beta, clip, adv_max = 0.7, 0.2, 5.0
    cond = encode_prompts(pipe, batch.prompts, "cpu")
    loss, metrics = kl.kl_pg_loss(pipe.unet, pipe.unet, _spec(pipe), batch, cond, None, beta, clip, adv_max, log_prob)
    expected, clipped = 0.0, []
    adv = batch.advantages.clamp(-adv_max, adv_max)
    with torch.no_grad():
        for t in range(4):
            lp, kl_t = step_log_prob_and_kl(pipe.unet, pipe.unet, _spec(pipe), batch.trajectory(), t, cond, None)
            ratio = torch.exp((lp - batch.log_probs[t]) / dims)
            expected += torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip, 1 + clip)).mean().item()
            expected += beta * (kl_t / dims).mean().item()
            clipped.append(((ratio - 1).abs() > clip).float().mean().item())
    assert math.isclose(loss.item(), expected, rel_tol=1e-4, abs_tol=1e-6)
    assert math.isclose(metrics["pg/clipfrac"], sum(clipped) / 4, abs_tol=1e-6) and metrics["pg/clipfrac"] > 0
    assert math.isclose(metrics["kl/path_kl"], batch.kls.sum(0).mean().item(), rel_tol=1e-6)
    loss.backward()
    assert all(p.grad is not None for p in lora.values())


def test_kl_pg_timestep_subset_is_scaled_to_the_full_sum(pipe):
    batch = _rollout(pipe, Brightness().score, ids=(0, 1, 2), s=2)
    cond = encode_prompts(pipe, batch.prompts, "cpu")
    args = (pipe.unet, pipe.unet, _spec(pipe), batch, cond, None, 0.7, 0.2, 5.0, "mean")
    with torch.no_grad():
        _, full = kl.kl_pg_loss(*args)
        _, sub = kl.kl_pg_loss(*args, step=3, num_timesteps=1)
    (t,) = kl.keyed_subset(4, 1, 0, 3, SALT_PG_TIMESTEPS)
    with torch.no_grad():
        _, kl_t = step_log_prob_and_kl(pipe.unet, pipe.unet, _spec(pipe), batch.trajectory(), t, cond, None)
    assert math.isclose(sub["pg/kl_term"], 4 * (kl_t / 256).mean().item(), rel_tol=1e-4)
    assert not math.isclose(sub["pg/kl_term"], full["pg/kl_term"], rel_tol=1e-3)


def _recipe(tmp_path, name, reward, **method):
    recipe = Recipe()
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# test prompts\n" + "\n".join(PROMPTS) + "\n")
    recipe.data.prompts, recipe.data.resolution = str(prompts), 16
    recipe.model.name_or_path = "tiny"
    recipe.method.name, recipe.method.reward, recipe.method.beta = name, reward, 0.1
    recipe.method.num_steps = 3
    for key, value in method.items():
        setattr(recipe.method, key, value)
    return recipe


def test_kl_grad_refuses_a_non_differentiable_reward(pipe, planted_rewards, tmp_path):
    with pytest.raises(UserError, match="kl_pg"):
        kl.make_kl_grad(_recipe(tmp_path, "kl_grad", "thresholded"), pipe, _Accelerator())


def test_kl_grad_method_runs_a_step(pipe, lora, planted_rewards, tmp_path):
    method = kl.make_kl_grad(_recipe(tmp_path, "kl_grad", "brightness", truncation_steps=2), pipe, _Accelerator())
    assert [r["prompt"] for r in method.dataset] == PROMPTS
    loss, metrics = method.step(pipe.unet, method.collate([method.dataset[i] for i in (2, 0)], [2, 0]), 0, 0, 0)
    assert torch.isfinite(loss) and {"kl/reward", "kl/path_kl", "kl/loss", "kl/objective"} <= set(metrics)
    loss.backward()
    assert all(p.grad is not None for p in lora.values())


def test_evaluate_scores_held_out_prompts_with_fixed_noise(pipe, planted_rewards, tmp_path):
    recipe = _recipe(tmp_path, "kl_grad", "brightness")
    assert kl.make_kl_grad(recipe, pipe, _Accelerator()).evaluate is None
    recipe.data.eval_prompts = recipe.data.prompts
    evaluate = kl.make_kl_grad(recipe, pipe, _Accelerator()).evaluate
    first, again = evaluate(pipe.unet), evaluate(pipe.unet)
    assert first == again and first["eval/kl/path_kl"] > 0
    assert math.isclose(first["eval/kl/objective"], first["eval/kl/reward"] - 0.1 * first["eval/kl/path_kl"])


def test_kl_pg_accepts_a_non_differentiable_reward(pipe, lora, planted_rewards, tmp_path):
    method = kl.make_kl_pg(_recipe(tmp_path, "kl_pg", "thresholded", samples_per_prompt=2, guidance_scale=2.0),
                           pipe, _Accelerator())
    loss, metrics = method.step(pipe.unet, method.collate([method.dataset[i] for i in (0, 1)], [0, 1]), 0, 0, 0)
    assert torch.isfinite(loss)
    assert {"kl/reward", "kl/path_kl", "pg/clipfrac", "pg/approx_kl", "pg/advantage_std", "kl/loss"} <= set(metrics)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values())


def test_kl_pg_inner_epochs_reuse_the_rollout_and_resume_exactly(pipe, lora, planted_rewards, tmp_path):
    recipe = _recipe(tmp_path, "kl_pg", "brightness", samples_per_prompt=2, num_inner_epochs=2)
    run_dir = tmp_path / "run"
    first = kl.make_kl_pg(recipe, pipe, _Accelerator(run_dir))
    batch = first.collate([first.dataset[i] for i in (0, 1)], [0, 1])
    other = first.collate([first.dataset[2]], [2])
    with torch.no_grad():
        _, m0 = first.step(pipe.unet, batch, 0, 0, 0)
        loss1, m1 = first.step(pipe.unet, other, 1, 0, 0)  # reuse step: the rows it is given are not sampled
    assert m1["kl/reward"] == m0["kl/reward"] and m1["kl/path_kl"] == m0["kl/path_kl"]
    assert len(list((run_dir / "rollouts" / "rank-000").glob("*.safetensors"))) == 1
    resumed = kl.make_kl_pg(recipe, pipe, _Accelerator(run_dir))  # a new process, resuming at step 1
    with torch.no_grad():
        loss1_resumed, _ = resumed.step(pipe.unet, other, 1, 0, 0)
    assert loss1_resumed.item() == loss1.item()
    with pytest.raises(RuntimeError, match="no stored rollout"):
        kl.make_kl_pg(recipe, pipe, _Accelerator(tmp_path / "empty")).step(pipe.unet, other, 3, 0, 0)


def test_kl_pg_reuses_the_rollout_of_the_micro_batch_the_trainer_names(pipe, lora, planted_rewards, tmp_path):
    """Two accumulation micro-batches: at the reuse step, micro-batch 1 gets the rollout sampled
    for micro-batch 1, whatever the order of the calls (the trainer passes the index)."""
    recipe = _recipe(tmp_path, "kl_pg", "brightness", samples_per_prompt=2, num_inner_epochs=2)
    method = kl.make_kl_pg(recipe, pipe, _Accelerator(tmp_path / "run"))
    rows = [method.collate([method.dataset[i]], [i]) for i in (0, 2)]
    with torch.no_grad():
        _, sampled0 = method.step(pipe.unet, rows[0], 0, 0, 0)
        _, sampled1 = method.step(pipe.unet, rows[1], 0, 1, 0)
        _, reused1 = method.step(pipe.unet, rows[0], 1, 1, 0)  # micro-batch 1 first this time
        _, reused0 = method.step(pipe.unet, rows[1], 1, 0, 0)
    assert sampled0["kl/reward"] != sampled1["kl/reward"]
    assert reused1["kl/reward"] == sampled1["kl/reward"] and reused0["kl/reward"] == sampled0["kl/reward"]


# -- flow families (SD3, FLUX): the same methods through the family table ------------------------------


def _flow_pipe(tmp_path, family):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tiny_flow import TRANSFORMER_LORA_TARGETS, build_tiny_flux, build_tiny_sd3

    from deradiff.models import add_lora

    p = build_tiny_sd3(tmp_path) if family == "sd3" else build_tiny_flux(tmp_path, guidance_embeds=True)
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"):
        if getattr(p, name, None) is not None:
            getattr(p, name).requires_grad_(False)
    add_lora(p.transformer, rank=2, target_modules=TRANSFORMER_LORA_TARGETS)
    with torch.no_grad():  # a nonzero LoRA, so the KL is not identically zero
        for n, w in p.transformer.named_parameters():
            if "lora_B" in n:
                w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(len(n))) * 0.2)
    return p


def _flow_recipe(tmp_path, family, name, **method):
    recipe = _recipe(tmp_path, name, "brightness", **method)
    recipe.model.kind, recipe.model.max_sequence_length = family, 16
    return recipe


def test_flow_kl_grad_on_sd3_samples_with_the_sde_and_trains_the_transformer_lora(planted_rewards, tmp_path):
    pipe = _flow_pipe(tmp_path, "sd3")
    recipe = _flow_recipe(tmp_path, "sd3", "kl_grad", truncation_steps=1, guidance_scale=2.0, noise_level=0.7)
    method = kl.make_kl_grad(recipe, pipe, _Accelerator())
    assert "3 flow SDE steps (noise_level=0.7, guidance=2)" in method.describe
    loss, metrics = method.step(pipe.transformer, method.collate([method.dataset[i] for i in (1, 0)], [1, 0]), 0, 0, 0)
    assert torch.isfinite(loss) and metrics["kl/path_kl"] > 0
    loss.backward()
    grads = [p.grad for n, p in pipe.transformer.named_parameters() if "lora" in n]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None for n, p in pipe.transformer.named_parameters() if "lora" not in n)


def test_flow_kl_pg_on_flux_with_text_encoders_dropped_matches_the_encoded_run(planted_rewards, tmp_path):
    recipe = _flow_recipe(tmp_path, "flux", "kl_pg", samples_per_prompt=2, guidance_scale=3.5)
    pipe = _flow_pipe(tmp_path / "a", "flux")
    batch = [{"prompt": p} for p in PROMPTS[:2]]
    with torch.no_grad():
        _, kept = kl.make_kl_pg(recipe, pipe, _Accelerator()).step(pipe.transformer, kl._collate(batch, [0, 1]), 0, 0, 0)
    recipe.model.drop_text_encoders = True
    recipe.sample.prompts = []
    method = kl.make_kl_pg(recipe, pipe, _Accelerator())
    assert pipe.text_encoder is None and pipe.text_encoder_2 is None
    assert "guidance input=3.5" in method.describe
    loss, dropped = method.step(pipe.transformer, method.collate(batch, [0, 1]), 0, 0, 0)
    assert dropped == pytest.approx(kept, rel=1e-5, abs=1e-7)  # the cached embeddings are the encoders'
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in pipe.transformer.named_parameters()
               if "lora" in n)


def test_a_recipe_for_another_family_is_refused_before_sampling(planted_rewards, tmp_path):
    pipe = _flow_pipe(tmp_path, "sd3")
    with pytest.raises(UserError, match="model.kind=sd15 but the pipeline is a StableDiffusion3Pipeline"):
        kl.make_kl_grad(_recipe(tmp_path, "kl_grad", "brightness"), pipe, _Accelerator())
