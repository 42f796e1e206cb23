"""Differentiable toy rewards: "toy" prefers vivid, large shapes; "toy_contrast" prefers large,
high-contrast ones and peaks where "toy" is zero. Both can be hacked.

Formula, for an image x in [-1, 1] of shape (3, H, W):

    u      = clamp((x + 1) / 2, 0, 1)              # RGB in [0, 1], what a viewer sees
    b      = G_sigma * u                            # per-channel Gaussian blur, reflect padding
    c(p)   = b(p) - mean_channels(b(p))             # chroma vector: the part off the gray axis
    v(p)   = 1.5 * |c(p)|^2                        # vividness: squared chroma, in [0, 1]
    reward = mean_p v(p)                            # in [0, 1]

v is 0 on any gray (black, white, the backgrounds) and 1 on the six vivid corners of the RGB
cube (pure red, yellow, green, cyan, blue, magenta); it behaves like HSV saturation x value,
so dull or dark colors score low. Averaging over pixels rewards the *area* of vivid color; the
blur hands gradient to background pixels next to the shape, so pushing the reward up makes the
shape's color purer and spreads it outwards. Squaring gives gray pixels zero slope, so under
an L2 leash a gray background stays gray until the leash is weak enough; then the color floods
it (a sharp transition, the over-optimization cliff). The prompt is ignored: that is the flaw.

Measured with `deradiff toy hack` (200 Adam steps of gradient ascent on the pixels of 96 real
images, 2 per caption, with an L2 leash of decreasing strength; adherence = shape, color and
background all right, KID to real data):

    leash        30     4    1.5     1    0.5   none
    reward    0.077 0.113  0.160 0.462  0.966  0.999
    adherence  1.00  1.00   1.00  0.66   0.18   0.06
    KID       -0.01  0.00   0.07  1.07   3.21   4.92

A strong or moderate leash turns colors pure while shape and background survive; without a
leash the maximum is reached by painting the whole image in one pure color.

Typical values: real procedural images score 0.01-0.20 (5-95%: 0.02-0.14, mean 0.07); a
uniform pure color scores 1.

A second reward with another optimum, for multi-objective realignment (docs/method.md section 2,
"Several rewards"), "toy_contrast":

    y(p)   = 0.299 R + 0.587 G + 0.114 B of b(p)    # luma of the blurred image, in [0, 1]
    reward = 4 * var_p y(p)                         # in [0, 1]

It is achromatic: a shape of area fraction a whose luma differs from the background's by d
scores 4 a (1 - a) d^2, which grows with the shape's size (a < 1/2 on every rendering of the
domain) and with its luminance contrast (a light-colored shape on a dark background, a dark one
on a light background). Its optimum, half the image black and half white, has vividness 0; the
vivid reward's optimum, one pure color everywhere, has contrast 0. Real procedural images score
0.002-0.22 (5-95%, mean 0.08), mostly set by color x background (yellow on light: near 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from deradiff.errors import UserError
from deradiff.rewards import Reward


def _gaussian_kernel(sigma: float, device, dtype) -> torch.Tensor:
    """(3, 1, k, k) depthwise Gaussian kernel, k = 2 * ceil(3 sigma) + 1, summing to 1."""
    radius = max(1, math.ceil(3 * sigma))
    grid = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    g = torch.exp(-0.5 * (grid / sigma) ** 2)
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(3, 1, -1, -1)


def _blur(u: torch.Tensor, sigma: float) -> torch.Tensor:
    """Per-channel Gaussian blur of (B, 3, H, W); reflect padding (replicate on tiny images)."""
    if sigma <= 0:
        return u
    kernel = _gaussian_kernel(sigma, u.device, u.dtype)
    pad = kernel.shape[-1] // 2
    mode = "reflect" if pad < min(u.shape[-2:]) else "replicate"  # reflect needs pad < side
    return F.conv2d(F.pad(u, (pad,) * 4, mode=mode), kernel, groups=3)


def vividness_map(images: torch.Tensor, blur_sigma: float = 1.0) -> torch.Tensor:
    """Per-pixel vividness v(p) of the blurred image: (B, 3, H, W) in [-1, 1] -> (B, H, W) in
    [0, 1]. Differentiable (zero gradient where `images` is outside [-1, 1])."""
    u = _blur(((images + 1) / 2).clamp(0, 1), blur_sigma)
    chroma = u - u.mean(dim=1, keepdim=True)
    return 1.5 * chroma.square().sum(dim=1)


def toy_reward(images: torch.Tensor, prompts: Sequence[str] | None = None, blur_sigma: float = 1.0) -> torch.Tensor:
    """Reward (B,) in [0, 1] for images (B, 3, H, W) in [-1, 1]; `prompts` is accepted for the
    common reward interface and ignored. Differentiable, batched (each row depends only on its
    own image), on the images' device and dtype."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise UserError(f"toy_reward expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
    return vividness_map(images, blur_sigma).mean(dim=(-2, -1))


_LUMA = (0.299, 0.587, 0.114)  # Rec. 601 weights of R, G, B


def luma_map(images: torch.Tensor, blur_sigma: float = 1.0) -> torch.Tensor:
    """Per-pixel luma of the blurred image: (B, 3, H, W) in [-1, 1] -> (B, H, W) in [0, 1].
    Differentiable (zero gradient where `images` is outside [-1, 1])."""
    u = _blur(((images + 1) / 2).clamp(0, 1), blur_sigma)
    weights = torch.tensor(_LUMA, device=u.device, dtype=u.dtype).view(1, 3, 1, 1)
    return (u * weights).sum(dim=1)


def contrast_reward(images: torch.Tensor, prompts: Sequence[str] | None = None,
                    blur_sigma: float = 1.0) -> torch.Tensor:
    """Reward (B,) in [0, 1]: 4 x the variance over pixels of the blurred image's luma, for images
    (B, 3, H, W) in [-1, 1]; `prompts` is ignored. Differentiable, batched, on the images' device
    and dtype. 1 for half black, half white (in large regions); 0 for any uniform image."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise UserError(f"contrast_reward expects images of shape (B, 3, H, W), got {tuple(images.shape)}")
    y = luma_map(images, blur_sigma).flatten(1)
    return 4.0 * (y - y.mean(dim=1, keepdim=True)).square().mean(dim=1)


class _BlurredReward(Reward):
    """A toy reward with a blur width; subclasses set `name` and `fn`."""

    differentiable = True

    def __init__(self, blur_sigma: float = 1.0):
        super().__init__()
        if blur_sigma < 0:
            raise UserError(f"blur_sigma must be >= 0, got {blur_sigma}")
        self.blur_sigma = blur_sigma

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        self.check_inputs(images, prompts)
        return self.fn(images, prompts, self.blur_sigma)


class ToyReward(_BlurredReward):
    """`toy_reward` behind the registry's interface: `score(images, prompts) -> (B,)`."""

    name = "toy"
    fn = staticmethod(toy_reward)


class ToyContrastReward(_BlurredReward):
    """`contrast_reward` behind the registry's interface: `score(images, prompts) -> (B,)`."""

    name = "toy_contrast"
    fn = staticmethod(contrast_reward)
