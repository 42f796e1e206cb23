"""Randomness keyed by (seed, step or epoch, sample id), independent of batching and ranks.

Drawing each sample's noise from its own generator makes a run with 1 process and batch 8
see exactly the same noise as 2 processes with batch 4 each, and a resumed run the same noise
as an uninterrupted one, without saving generator states.
"""

from __future__ import annotations

import torch

# Salts: which random draw a keyed generator makes, so that no two draws share a stream. Named
# here, in one place; the values are fixed (changing one changes the numbers of every run).
SALT_DPO_VAE = 1  # Diffusion-DPO: the VAE posterior draw of each image
SALT_DPO_NOISE = 3  # Diffusion-DPO: the noise of each pair (shared by its two images)
SALT_DPO_TIMESTEP = 4  # Diffusion-DPO: the timestep of each pair
SALT_DPO_SIGMA = 5  # flow Diffusion-DPO (SD3, FLUX): the sigma of each pair
SALT_ROLLOUT_INIT = 10  # rollouts: the initial latent x_T of each sample
SALT_ROLLOUT_STEP = 11  # rollouts: sampling step i draws its noise with salt SALT_ROLLOUT_STEP + i
SALT_KL_STEPS = 1 << 30  # kl_grad: the earlier steps re-evaluated for the KL gradient
SALT_PG_TIMESTEPS = (1 << 30) + 1  # kl_pg: the keyed subset of timesteps in the loss


def keyed_generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded by a 64-bit mix of seed and keys (a pure function of them)."""
    value = seed & 0xFFFFFFFF
    for key in keys:  # a simple 64-bit mix; torch seeds are 64-bit
        value = (value * 6364136223846793005 + (int(key) & 0xFFFFFFFF) + 1442695040888963407) % (1 << 63)
    return torch.Generator().manual_seed(value)


def keyed_randn(shape: tuple[int, ...], keys: list[int], seed: int, step: int, salt: int = 0) -> torch.Tensor:
    """(len(keys), *shape) standard normals; row i depends only on (seed, step, salt, keys[i])."""
    return torch.stack([torch.randn(shape, generator=keyed_generator(seed, step, salt, k)) for k in keys])


def keyed_randint(high: int, keys: list[int], seed: int, step: int, salt: int = 0) -> torch.Tensor:
    """(len(keys),) integers in [0, high); entry i depends only on (seed, step, salt, keys[i])."""
    return torch.cat([torch.randint(0, high, (1,), generator=keyed_generator(seed, step, salt, k)) for k in keys])
