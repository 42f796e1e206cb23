"""The toy quality bar: does a pipeline draw what its prompts say, as judged by the classifier?

`measure_quality(pipe)` samples `n` images (prompts cycled through a caption list, the
default sampler, seeded per batch) and returns color/shape/background accuracy. Command:

    deradiff toy sample-check                      # shipped pipeline, 512 images, test prompts
    deradiff toy sample-check --path DIR --images 96 --guidance 5
    deradiff toy sample-check --family flow        # the flow-matching twin (assets/flow/)
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass

import torch

from deradiff.toy.domain import BACKGROUND_NAMES, COLOR_NAMES, SHAPES, parse_caption

QUALITY_BAR = {"color": 0.90, "shape": 0.80}


@dataclass
class QualityReport:
    """Accuracies in [0, 1] over `n` generated images; `*_ci` is the 95% normal-approximation
    half-width of each accuracy."""

    n: int
    color: float
    shape: float
    background: float
    color_ci: float
    shape_ci: float
    background_ci: float
    guidance_scale: float
    num_inference_steps: int

    def passes(self) -> bool:
        return all(getattr(self, k) >= v for k, v in QUALITY_BAR.items())

    def summary(self) -> str:
        return (
            f"color {self.color:.1%} ± {self.color_ci:.1%}, shape {self.shape:.1%} ± {self.shape_ci:.1%}, "
            f"background {self.background:.1%} ± {self.background_ci:.1%} on {self.n} images "
            f"(guidance {self.guidance_scale}, {self.num_inference_steps} sampling steps); quality bar "
            f"color >= {QUALITY_BAR['color']:.0%}, shape >= {QUALITY_BAR['shape']:.0%}: "
            f"{'PASS' if self.passes() else 'FAIL'}"
        )


def labels_of(captions: list[str]) -> dict[str, torch.Tensor]:
    """Integer labels per head for `captions`, (B,) int64 each."""
    specs = [parse_caption(c) for c in captions]
    return {
        "shape": torch.tensor([SHAPES.index(s.shape) for s in specs]),
        "color": torch.tensor([COLOR_NAMES.index(s.color) for s in specs]),
        "background": torch.tensor([BACKGROUND_NAMES.index(s.background) for s in specs]),
    }


@torch.no_grad()
def generate(pipe, captions: list[str], batch_size: int = 64, seed: int = 0, progress: bool = False,
             **sampling) -> torch.Tensor:
    """Images (N, 3, H, W) in [-1, 1] for `captions`; batch i uses generator seed `seed + i`.
    `sampling` overrides toy_sampling_kwargs()."""
    from tqdm.auto import tqdm

    from deradiff.toy.pipeline import toy_sampling_kwargs

    kwargs = {**toy_sampling_kwargs(), **sampling, "output_type": "pt"}
    chunks = [captions[i : i + batch_size] for i in range(0, len(captions), batch_size)]
    images = []
    for i, chunk in enumerate(tqdm(chunks, desc="sampling", disable=not progress)):
        out = pipe(chunk, generator=torch.Generator().manual_seed(seed + i), **kwargs).images
        images.append(out.float() * 2 - 1)
    return torch.cat(images)


def measure_quality(pipe, classifier=None, n: int = 512, captions: list[str] | None = None,
                    batch_size: int = 64, seed: int = 0, progress: bool = False, **sampling) -> QualityReport:
    """Sample `n` images with prompts cycled through `captions` (default: the test prompts) and
    score them with `classifier` (default: the shipped one)."""
    from deradiff.toy.classifier import load_classifier
    from deradiff.toy.pipeline import toy_sampling_kwargs
    from deradiff.toy.prompts import test_prompts

    captions = captions or test_prompts()
    prompts = [captions[i % len(captions)] for i in range(n)]
    classifier = classifier if classifier is not None else load_classifier()
    images = generate(pipe, prompts, batch_size=batch_size, seed=seed, progress=progress, **sampling)
    pred, truth = classifier.predict(images), labels_of(prompts)
    acc = {k: (pred[k] == truth[k]).float().mean().item() for k in truth}
    ci = {f"{k}_ci": 1.96 * math.sqrt(max(v * (1 - v), 1e-12) / n) for k, v in acc.items()}
    kwargs = {**toy_sampling_kwargs(), **sampling}
    return QualityReport(n=n, **acc, **ci, guidance_scale=kwargs["guidance_scale"],
                         num_inference_steps=kwargs["num_inference_steps"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--family", choices=["unet", "flow"], default="unet",
                        help="unet: the toy StableDiffusionPipeline; flow: its StableDiffusion3Pipeline twin")
    parser.add_argument("--path", default=None,
                        help="asset root written by `deradiff toy pretrain [--family flow] --out DIR` "
                             "(default: the shipped weights)")
    parser.add_argument("--classifier", default=None,
                        help="asset root or folder of the classifier (default: --path for unet, else the shipped one)")
    parser.add_argument("--images", type=int, default=512, help="number of images to generate and classify")
    parser.add_argument("--prompts", default="test", choices=["test", "train", "all"],
                        help="caption set cycled over the images")
    parser.add_argument("--guidance", type=float, default=None,
                        help="classifier-free guidance scale (default: the family's sampler's)")
    parser.add_argument("--steps", type=int, default=None, help="sampling steps (default: the family's sampler's)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per pipeline call")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first batch's generator")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave torch's default)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def _load(args: argparse.Namespace):
    """(pipeline, classifier, default sampling kwargs) of --family at --path."""
    from deradiff.toy.classifier import load_classifier

    if args.family == "flow":
        from deradiff.toy.flow import flow_sampling_kwargs, load_flow_pipeline, resolve_flow_root

        return (load_flow_pipeline(resolve_flow_root(args.path)), load_classifier(args.classifier),
                flow_sampling_kwargs())
    from deradiff.toy.pipeline import load_toy_pipeline, resolve_asset_root, toy_sampling_kwargs

    root = resolve_asset_root(args.path)
    return load_toy_pipeline(root), load_classifier(args.classifier or root), toy_sampling_kwargs()


def run(args: argparse.Namespace) -> int:
    from deradiff.errors import UserError
    from deradiff.toy.prompts import prompt_set

    if args.images < 1 or (args.steps is not None and args.steps < 1) or args.batch_size < 1:
        raise UserError("--images, --steps and --batch-size must be positive")
    pipe, classifier, sampling = _load(args)
    if args.guidance is not None:
        sampling["guidance_scale"] = args.guidance
    if args.steps is not None:
        sampling["num_inference_steps"] = args.steps
    report = measure_quality(pipe, classifier, n=args.images, captions=prompt_set(args.prompts),
                             batch_size=args.batch_size, seed=args.seed, progress=True, **sampling)
    print(json.dumps(asdict(report), indent=2) if args.json else report.summary())
    return 0 if report.passes() else 1
