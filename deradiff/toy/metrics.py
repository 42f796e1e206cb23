"""Prior-fidelity metrics for generated toy images, each with a confidence interval over prompts.

    from deradiff.toy.metrics import FidelityJudge
    judge = FidelityJudge()                        # shipped classifier; caches real features
    m = judge.metrics(images, prompts)             # images (N, 3, H, W) in [-1, 1], N prompts
    m["fidelity/color_acc"]                        # Estimate(value, lo, hi)

Metrics (namespaced names; the toy classifier is the judge, its penultimate features, scaled
to unit RMS on real data, the space):
- `fidelity/color_acc`, `fidelity/shape_acc`, `fidelity/background_acc`: fraction of images whose
  predicted color / shape / background matches the prompt's; `fidelity/adherence`: all three.
- `fidelity/diversity`: mean pairwise L2 distance between the features of a prompt's images,
  averaged over prompts; `fidelity/diversity_rel`: the same divided, per prompt, by that of real
  procedural images of the prompt (1 = as varied as the data, 0 = mode collapse).
- `fidelity/kid`: per prompt, the kernel inception distance (unbiased MMD^2 with KID's cubic
  polynomial kernel) between the prompt's images and real procedural images of the same
  caption, averaged over prompts; about 0 when generated images look like the data.

Intervals: a bootstrap over prompts (deradiff.stats.bootstrap_ci). Per-prompt metrics (diversity,
KID) need at least 2 images per prompt; prompts with one image are left out of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from deradiff.errors import UserError
from deradiff.stats import Estimate, bootstrap_ci
from deradiff.toy.domain import (
    BACKGROUND_NAMES,
    COLOR_NAMES,
    SHAPES,
    all_captions,
    parse_caption,
    sample,
    to_tensor,
)

HEADS = ("shape", "color", "background")
REFERENCE_SEED = 9_000  # stream of the real reference images; disjoint from training streams


def kernel_distance(x: torch.Tensor, y: torch.Tensor, degree: int = 3, coef: float = 1.0) -> torch.Tensor:
    """Unbiased MMD^2 between feature sets x (m, D) and y (n, D), m, n >= 2, with the KID kernel
    k(a, b) = (a . b / D + coef) ** degree. Same estimator as torchmetrics' KID (whose
    `poly_mmd` needs m == n), for unequal set sizes. Can be slightly negative."""
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise UserError(f"kernel_distance needs at least 2 samples per set, got {x.shape[0]} and {y.shape[0]}")
    x, y = x.double(), y.double()
    d = x.shape[1]
    k_xx = (x @ x.T / d + coef) ** degree
    k_yy = (y @ y.T / d + coef) ** degree
    k_xy = (x @ y.T / d + coef) ** degree
    m, n = x.shape[0], y.shape[0]
    within_x = (k_xx.sum() - k_xx.diagonal().sum()) / (m * (m - 1))
    within_y = (k_yy.sum() - k_yy.diagonal().sum()) / (n * (n - 1))
    return within_x + within_y - 2 * k_xy.mean()


def mean_pairwise_distance(features: torch.Tensor) -> torch.Tensor:
    """Mean L2 distance over the distinct pairs of rows of features (n, D), n >= 2."""
    n = features.shape[0]
    dist = torch.cdist(features.double(), features.double())
    return dist.sum() / (n * (n - 1))


@lru_cache(maxsize=512)
def _reference_images(caption: str, n: int, size: int) -> torch.Tensor:
    arrays = np.stack([sample(REFERENCE_SEED, i, size, caption)[0] for i in range(n)])
    return to_tensor(arrays)


def reference_images(caption: str, n: int = 64, size: int = 32) -> torch.Tensor:
    """n real procedural images (n, 3, size, size) in [-1, 1] of `caption` (fixed stream; cached)."""
    return _reference_images(caption, n, size).clone()


def _targets(prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    labels: dict[str, list[int]] = {k: [] for k in HEADS}
    for prompt in prompts:
        try:
            spec = parse_caption(prompt)
        except ValueError as err:
            raise UserError(f"fidelity metrics need toy captions: {err}") from None
        labels["shape"].append(SHAPES.index(spec.shape))
        labels["color"].append(COLOR_NAMES.index(spec.color))
        labels["background"].append(BACKGROUND_NAMES.index(spec.background))
    return {k: torch.tensor(v) for k, v in labels.items()}


def _check(images: torch.Tensor, prompts: Sequence[str]) -> None:
    if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
        shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
        raise UserError(f"fidelity metrics take float images (N, 3, H, W) in [-1, 1], got {shape}")
    if isinstance(prompts, str) or len(prompts) != images.shape[0]:
        raise UserError(f"fidelity metrics need one prompt per image: {images.shape[0]} images, "
                        f"{1 if isinstance(prompts, str) else len(prompts)} prompts")


class FidelityJudge:
    """The toy classifier plus cached features of real reference images; build once, call often.

    `classifier`: anything with `features(images) -> (B, D)` and `logits(images) -> dict` (default:
    the shipped toy classifier), assumed frozen. Features are divided by one fixed scale (their
    RMS per dimension on real images of every caption), so distances and KID are in units of
    the data's own feature spread, comparable across classifiers.
    """

    def __init__(self, classifier=None, n_reference: int = 64, batch_size: int = 256):
        if classifier is None:
            from deradiff.toy.classifier import load_classifier

            classifier = load_classifier()
        if n_reference < 2:
            raise UserError(f"n_reference must be >= 2 (KID and diversity need pairs), got {n_reference}")
        self.classifier = classifier.eval()
        self.n_reference, self.batch_size = n_reference, batch_size
        self.device = next(classifier.parameters()).device
        self._reference: dict[tuple[str, int], torch.Tensor] = {}
        pool = torch.cat([reference_images(c, 8) for c in all_captions()])
        raw, _ = self._run(pool, scaled=False)
        self.scale = raw.pow(2).mean().sqrt().clamp_min(1e-12).item()

    @torch.no_grad()
    def _run(self, images: torch.Tensor, scaled: bool = True) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Features (N, D) float32 on the CPU and predicted labels per head (N,)."""
        feats, preds = [], {k: [] for k in HEADS}
        for chunk in images.split(self.batch_size):
            chunk = chunk.to(self.device)
            feats.append(self.classifier.features(chunk).float().cpu())
            for k, v in self.classifier.logits(chunk).items():
                if k in preds:
                    preds[k].append(v.argmax(-1).cpu())
        feats_t = torch.cat(feats)
        return (feats_t / self.scale if scaled else feats_t), {k: torch.cat(v) for k, v in preds.items()}

    def reference_features(self, caption: str, size: int = 32) -> torch.Tensor:
        """(n_reference, D) scaled features of real images of `caption` (cached)."""
        key = (caption, size)
        if key not in self._reference:
            self._reference[key] = self._run(reference_images(caption, self.n_reference, size))[0]
        return self._reference[key]

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Scaled classifier features (N, D) float32 on the CPU of images (N, 3, H, W) in [-1, 1]
        (the space of KID and diversity; evaluation compares sample sets in it)."""
        _check(images, [""] * images.shape[0] if torch.is_tensor(images) else [])
        return self._run(images)[0]

    def adherence(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Per-image correctness (N,) bool for 'shape', 'color', 'background' and 'all'."""
        _check(images, prompts)
        return _correct(self._run(images)[1], prompts)

    def metrics(self, images: torch.Tensor, prompts: Sequence[str], n_boot: int = 1000,
                alpha: float = 0.05, seed: int = 0) -> dict[str, Estimate]:
        """Every metric of the module docstring for images (N, 3, H, W) in [-1, 1] and their N
        prompts, as name -> Estimate(value, lo, hi) with a 1 - alpha bootstrap interval over prompts."""
        _check(images, prompts)
        feats, pred = self._run(images)
        correct = _correct(pred, prompts)
        out: dict[str, Estimate] = {}
        for key, name in (("color", "color_acc"), ("shape", "shape_acc"),
                          ("background", "background_acc"), ("all", "adherence")):
            out[f"fidelity/{name}"] = bootstrap_ci(correct[key].double(), prompts, n_boot, alpha, seed)

        by_prompt: dict[str, list[int]] = {}
        for i, prompt in enumerate(prompts):
            by_prompt.setdefault(prompt, []).append(i)
        multi = [p for p, idx in by_prompt.items() if len(idx) >= 2]
        if not multi:  # per-prompt metrics are undefined with one image per prompt
            nan = Estimate(float("nan"), float("nan"), float("nan"))
            out.update({"fidelity/diversity": nan, "fidelity/diversity_rel": nan, "fidelity/kid": nan})
            return out
        diversity, diversity_rel, kid = [], [], []
        for prompt in multi:
            real = self.reference_features(prompt, images.shape[-1])
            gen = feats[by_prompt[prompt]]
            div = mean_pairwise_distance(gen).item()
            diversity.append(div)
            diversity_rel.append(div / max(mean_pairwise_distance(real).item(), 1e-12))
            kid.append(kernel_distance(gen, real).item())
        out["fidelity/diversity"] = bootstrap_ci(diversity, multi, n_boot, alpha, seed)
        out["fidelity/diversity_rel"] = bootstrap_ci(diversity_rel, multi, n_boot, alpha, seed)
        out["fidelity/kid"] = bootstrap_ci(kid, multi, n_boot, alpha, seed)
        return out


def _correct(pred: dict[str, torch.Tensor], prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    target = _targets(prompts)
    correct = {k: pred[k] == target[k] for k in HEADS}
    correct["all"] = correct["shape"] & correct["color"] & correct["background"]
    return correct


def fidelity_metrics(
    images: torch.Tensor,
    prompts: Sequence[str],
    classifier=None,
    n_reference: int = 64,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, Estimate]:
    """One-shot `FidelityJudge(classifier, n_reference).metrics(images, prompts, ...)`; build a
    judge yourself to reuse its cached reference features across calls."""
    return FidelityJudge(classifier, n_reference).metrics(images, prompts, n_boot, alpha, seed)

