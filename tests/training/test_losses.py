"""The training losses against hand formulas, torch.distributions and the reference scripts."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from deradiff.training.losses import (
    diffusion_dpo_loss,
    dpo_logits,
    dpo_scale,
    gaussian_kl,
    gaussian_log_prob,
    implicit_accuracy,
    kl_regularized_reward_loss,
    normalize_advantages_per_prompt,
    per_sample_mse,
    ppo_loss,
)


def _errors(b: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.rand(b, generator=g, dtype=torch.float64) * 0.2 + 0.1 for _ in range(4))


# -- Diffusion-DPO ------------------------------------------------------------------------------


@pytest.mark.parametrize("convention, scale", [("official", 0.5), ("diffusers", 1.0)])
def test_dpo_loss_matches_hand_formula(convention, scale):
    mw, ml, rw, rl = _errors()
    beta = 3000.0
    loss, metrics = diffusion_dpo_loss(mw, ml, rw, rl, beta=beta, convention=convention)
    expected = [
        -math.log(1 / (1 + math.exp(scale * beta * ((a - b) - (c - d)))))
        for a, b, c, d in zip(mw.tolist(), ml.tolist(), rw.tolist(), rl.tolist(), strict=True)
    ]
    assert loss.item() == pytest.approx(sum(expected) / len(expected), rel=1e-10)
    assert metrics["dpo/loss"] == pytest.approx(loss.item())


def test_conventions_differ_by_a_factor_two():
    mw, ml, rw, rl = _errors(seed=1)
    official, _ = diffusion_dpo_loss(mw, ml, rw, rl, beta=5000, convention="official")
    diffusers, _ = diffusion_dpo_loss(mw, ml, rw, rl, beta=2500, convention="diffusers")
    assert official.item() == pytest.approx(diffusers.item(), rel=1e-12)
    same_beta, _ = diffusion_dpo_loss(mw, ml, rw, rl, beta=5000, convention="diffusers")
    assert abs(same_beta.item() - official.item()) > 1e-3
    assert dpo_scale(5000, "official") == 2500 and dpo_scale(2500, "diffusers") == 2500
    with pytest.raises(ValueError, match="convention"):
        dpo_scale(1.0, "half")


def test_dpo_gradient_sign_and_reference_is_constant():
    mw, ml, rw, rl = (t.clone().requires_grad_(True) for t in _errors(seed=2))
    loss, _ = diffusion_dpo_loss(mw, ml, rw, rl, beta=2000)
    loss.backward()
    assert (mw.grad > 0).all(), "lowering the model's error on x_w must lower the loss"
    assert (ml.grad < 0).all(), "raising the model's error on x_l must lower the loss"
    assert rw.grad is None and rl.grad is None
    # A step along the gradient lowers the loss.
    with torch.no_grad():
        lowered, _ = diffusion_dpo_loss(mw - 1e-5 * mw.grad.sign(), ml, rw, rl, beta=2000)
    assert lowered.item() < loss.item()


def test_implicit_accuracy_margins_and_kl_proxy_on_constructed_pairs():
    # pair 0: model prefers x_w more than the reference (correct); pair 1: less (wrong); pair 2: tie.
    mw = torch.tensor([0.10, 0.30, 0.20])
    ml = torch.tensor([0.30, 0.10, 0.20])
    rw = torch.tensor([0.20, 0.20, 0.25])
    rl = torch.tensor([0.20, 0.20, 0.25])
    _, m = diffusion_dpo_loss(mw, ml, rw, rl, beta=10.0)
    assert m["dpo/implicit_acc"] == pytest.approx((1 + 0 + 0.5) / 3)
    assert m["dpo/model_margin"] == pytest.approx(((0.1 - 0.3) + (0.3 - 0.1) + 0.0) / 3)
    assert m["dpo/ref_margin"] == pytest.approx(0.0)
    expected_proxy = ((0.10 - 0.2 + 0.30 - 0.2) + (0.30 - 0.2 + 0.10 - 0.2) + (0.2 - 0.25 + 0.2 - 0.25)) / 2 / 3
    assert m["dpo/kl_proxy"] == pytest.approx(expected_proxy)
    assert m["dpo/model_mse"] == pytest.approx(float(((mw + ml) / 2).mean()))
    # At initialization (model == reference) every pair is a tie: loss log 2, accuracy 1/2.
    loss0, m0 = diffusion_dpo_loss(rw, rl, rw, rl, beta=5000)
    assert loss0.item() == pytest.approx(math.log(2)) and m0["dpo/implicit_acc"] == 0.5
    assert m0["dpo/kl_proxy"] == 0.0


def test_ranking_by_draw_averaged_margin_differs_from_per_draw_accuracy():
    # One pair, four (timestep, noise) draws: one large correct margin, three small wrong ones.
    # Per draw the model is right 1 time in 4; its implicit reward (the mean margin) ranks it right.
    rw, rl = torch.zeros(4), torch.zeros(4)
    mw, ml = torch.tensor([-1.0, 0.1, 0.1, 0.1]), torch.zeros(4)
    logits = dpo_logits(mw, ml, rw, rl)
    assert logits.tolist() == pytest.approx([1.0, -0.1, -0.1, -0.1])
    assert float(implicit_accuracy(logits).mean()) == 0.25
    assert float(implicit_accuracy(logits.mean().reshape(1))) == 1.0
    _, m = diffusion_dpo_loss(mw, ml, rw, rl, beta=1.0)
    assert m["dpo/implicit_acc"] == 0.25


def _diffusers_sd15_dpo(model_pred, ref_pred, target, beta_dpo):
    """diffusers examples/research_projects/diffusion_dpo/train_diffusion_dpo.py, loss_type sigmoid."""
    model_losses = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    model_losses = model_losses.mean(dim=list(range(1, len(model_losses.shape))))
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    ref_loss = F.mse_loss(ref_pred.float(), target.float(), reduction="none")
    ref_loss = ref_loss.mean(dim=list(range(1, len(ref_loss.shape))))
    ref_losses_w, ref_losses_l = ref_loss.chunk(2)
    ref_diff = ref_losses_w - ref_losses_l
    logits = ref_diff - model_diff
    loss = -1 * F.logsigmoid(beta_dpo * logits).mean()
    implicit_acc = (logits > 0).sum().float() / logits.size(0)
    implicit_acc += 0.5 * (logits == 0).sum().float() / logits.size(0)
    return loss, implicit_acc


def _official_dpo(model_pred, ref_pred, target, beta_dpo):
    """SalesforceAIResearch/DiffusionDPO train.py, train_method dpo."""
    model_losses = (model_pred - target).pow(2).mean(dim=[1, 2, 3])
    model_losses_w, model_losses_l = model_losses.chunk(2)
    model_diff = model_losses_w - model_losses_l
    ref_losses = (ref_pred - target).pow(2).mean(dim=[1, 2, 3])
    ref_losses_w, ref_losses_l = ref_losses.chunk(2)
    ref_diff = ref_losses_w - ref_losses_l
    inside_term = -0.5 * beta_dpo * (model_diff - ref_diff)
    implicit_acc = (inside_term > 0).sum().float() / inside_term.size(0)
    return -1 * F.logsigmoid(inside_term).mean(), implicit_acc


def test_equals_the_diffusers_and_official_scripts():
    g = torch.Generator().manual_seed(3)
    b = 6
    target = torch.randn(2 * b, 4, 8, 8, generator=g)
    target[b:] = target[:b]  # shared noise within a pair, as both scripts do
    model_pred = target + 0.3 * torch.randn(2 * b, 4, 8, 8, generator=g)
    ref_pred = target + 0.3 * torch.randn(2 * b, 4, 8, 8, generator=g)
    m_w, m_l = per_sample_mse(model_pred, target).chunk(2)
    r_w, r_l = per_sample_mse(ref_pred, target).chunk(2)

    ours, metrics = diffusion_dpo_loss(m_w, m_l, r_w, r_l, beta=2500, convention="diffusers")
    theirs, acc = _diffusers_sd15_dpo(model_pred, ref_pred, target, 2500)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    assert metrics["dpo/implicit_acc"] == pytest.approx(acc.item())

    ours, metrics = diffusion_dpo_loss(m_w, m_l, r_w, r_l, beta=5000, convention="official")
    theirs, acc = _official_dpo(model_pred, ref_pred, target, 5000)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    assert metrics["dpo/implicit_acc"] == pytest.approx(acc.item())  # no exact ties here


def test_per_sample_mse_and_shape_checks():
    a = torch.zeros(3, 2, 2)
    b = torch.tensor([0.0, 1.0, 2.0]).view(3, 1, 1).expand(3, 2, 2)
    assert torch.equal(per_sample_mse(a, b), torch.tensor([0.0, 1.0, 4.0]))
    with pytest.raises(ValueError, match="shape"):
        per_sample_mse(a, torch.zeros(3, 4))
    with pytest.raises(ValueError, match="shape"):
        diffusion_dpo_loss(torch.zeros(3), torch.zeros(2), torch.zeros(3), torch.zeros(3), beta=1.0)


# -- Gaussian KL and log-probabilities ----------------------------------------------------------


@pytest.mark.parametrize("sigma", [0.37, torch.tensor([0.2, 0.5, 1.3])])
def test_gaussian_kl_matches_torch_distributions(sigma):
    g = torch.Generator().manual_seed(4)
    mu_a = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    mu_b = torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64)
    s = torch.as_tensor(sigma, dtype=torch.float64)
    s_full = s.view(-1, 1, 1, 1) if s.ndim else s
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu_a, s_full.expand_as(mu_a)), torch.distributions.Normal(mu_b, s_full.expand_as(mu_b))
    ).sum(dim=(1, 2, 3))
    kl = gaussian_kl(mu_a, mu_b, sigma)
    assert kl.shape == (3,)
    torch.testing.assert_close(kl, ref)
    torch.testing.assert_close(gaussian_kl(mu_b, mu_a, sigma), kl)  # symmetric for equal variances
    assert torch.equal(gaussian_kl(mu_a, mu_a, sigma), torch.zeros(3, dtype=torch.float64))


def test_gaussian_log_prob_matches_torch_distributions():
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64)
    mu = torch.randn(4, 3, 6, 6, generator=g, dtype=torch.float64)
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0], dtype=torch.float64)
    ref = torch.distributions.Normal(mu, sigma.view(-1, 1, 1, 1).expand_as(mu)).log_prob(x).sum(dim=(1, 2, 3))
    torch.testing.assert_close(gaussian_log_prob(x, mu, sigma), ref)
    torch.testing.assert_close(gaussian_log_prob(x, mu, sigma, reduction="mean"), ref / (3 * 6 * 6))
    with pytest.raises(ValueError, match="sigma"):
        gaussian_log_prob(x, mu, 0.0)
    with pytest.raises(ValueError, match="reduction"):
        gaussian_log_prob(x, mu, 1.0, reduction="max")


# -- PPO --------------------------------------------------------------------------------------


def test_ppo_unit_ratio_is_policy_gradient():
    old = torch.tensor([-1.0, -2.0, -3.0])
    new = old.clone().requires_grad_(True)
    adv = torch.tensor([1.0, -0.5, 2.0])
    loss, m = ppo_loss(new, old, adv, clip_range=0.2)
    assert loss.item() == pytest.approx(-adv.mean().item())
    loss.backward()
    torch.testing.assert_close(new.grad, -adv / 3)  # d(-A * exp(new - old))/d new at ratio 1
    assert m["ppo/clipfrac"] == 0.0 and m["ppo/approx_kl"] == 0.0 and m["ppo/ratio"] == pytest.approx(1.0)


def test_ppo_clipping_stops_the_gradient_only_past_the_trust_region():
    clip = 0.1
    old = torch.zeros(4)
    # ratios 1.5, 0.5, 1.5, 0.5 with advantages +, +, -, -
    new = torch.log(torch.tensor([1.5, 0.5, 1.5, 0.5])).requires_grad_(True)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    loss, m = ppo_loss(new, old, adv, clip_range=clip)
    loss.backward()
    # A > 0, ratio above 1 + clip: clipped, no gradient. A > 0, ratio below 1 - clip: unclipped
    # (the pessimistic term), gradient -A * ratio / B. Mirror image for A < 0.
    torch.testing.assert_close(new.grad, torch.tensor([0.0, -0.5 / 4, 1.5 / 4, 0.0]))
    expected = (-(1 + clip) + -0.5 + 1.5 + (1 - clip)) / 4
    assert loss.item() == pytest.approx(expected)
    assert m["ppo/clipfrac"] == 1.0
    assert m["ppo/approx_kl"] == pytest.approx(0.5 * float((new.detach() ** 2).mean()))


def test_ppo_advantage_clipping_and_bad_clip_range():
    loss, _ = ppo_loss(torch.zeros(2), torch.zeros(2), torch.tensor([100.0, -100.0]), 0.2, adv_clip_max=5.0)
    assert loss.item() == pytest.approx(0.0)
    loss, _ = ppo_loss(torch.zeros(2), torch.zeros(2), torch.tensor([100.0, 0.0]), 0.2, adv_clip_max=5.0)
    assert loss.item() == pytest.approx(-2.5)
    with pytest.raises(ValueError, match="clip_range"):
        ppo_loss(torch.zeros(2), torch.zeros(2), torch.zeros(2), 0.0)


def test_advantages_are_normalized_per_prompt_with_global_fallback():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 10.0, 40.0, 7.0])
    prompts = ["a", "a", "a", "b", "b", "b", "c"]
    adv = normalize_advantages_per_prompt(rewards, prompts, eps=0.0)
    for rows in ([0, 1, 2], [3, 4, 5]):
        group = adv[rows]
        assert group.mean().item() == pytest.approx(0.0, abs=1e-6)
        assert group.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-6)
    # "c" has one sample: batch-wide statistics.
    expected_c = (7.0 - rewards.mean()) / rewards.std(unbiased=False)
    assert adv[6].item() == pytest.approx(expected_c.item(), rel=1e-6)
    # The ordering within a prompt is kept, and integer ids (a tensor) work the same.
    assert adv[0] < adv[1] < adv[2]
    same = normalize_advantages_per_prompt(rewards, torch.tensor([0, 0, 0, 1, 1, 1, 2]), eps=0.0)
    torch.testing.assert_close(same, adv)
    # Equal rewards within a prompt give zero advantages, not NaN.
    flat = normalize_advantages_per_prompt(torch.tensor([2.0, 2.0]), ["x", "x"])
    assert torch.equal(flat, torch.zeros(2))
    with pytest.raises(ValueError, match="prompt ids"):
        normalize_advantages_per_prompt(rewards, prompts[:3])


# -- KL-regularized reward ----------------------------------------------------------------------


def test_kl_regularized_reward_loss_value_and_gradients():
    reward = torch.tensor([1.0, 3.0]).requires_grad_(True)
    kl = torch.tensor([4.0, 8.0]).requires_grad_(True)
    loss, m = kl_regularized_reward_loss(reward, kl, beta=0.5)
    assert loss.item() == pytest.approx(-((1 - 2) + (3 - 4)) / 2)
    loss.backward()
    torch.testing.assert_close(reward.grad, torch.full((2,), -0.5))
    torch.testing.assert_close(kl.grad, torch.full((2,), 0.25))
    assert m["kl/reward"] == 2.0 and m["kl/path_kl"] == 6.0 and m["kl/objective"] == -1.0
    assert m["kl/loss"] == pytest.approx(1.0) and m["kl/reward_std"] == 1.0
    with pytest.raises(ValueError, match="shape"):
        kl_regularized_reward_loss(torch.zeros(2), torch.zeros(3), beta=1.0)
