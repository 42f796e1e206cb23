"""Randomness keyed by (seed, step or epoch, sample id), independent of batching and ranks.

Drawing each sample's noise from its own generator makes a run with 1 process and batch 8
see exactly the same noise as 2 processes with batch 4 each, and a resumed run the same noise
as an uninterrupted one, without saving generator states.
"""

from __future__ import annotations

import torch


def _generator(seed: int, *keys: int) -> torch.Generator:
    value = seed & 0xFFFFFFFF
    for key in keys:  # a simple 64-bit mix; torch seeds are 64-bit
        value = (value * 6364136223846793005 + (int(key) & 0xFFFFFFFF) + 1442695040888963407) % (1 << 63)
    return torch.Generator().manual_seed(value)


def keyed_randn(shape: tuple[int, ...], keys: list[int], seed: int, step: int, salt: int = 0) -> torch.Tensor:
    """(len(keys), *shape) standard normals; row i depends only on (seed, step, salt, keys[i])."""
    return torch.stack([torch.randn(shape, generator=_generator(seed, step, salt, k)) for k in keys])


def keyed_randint(high: int, keys: list[int], seed: int, step: int, salt: int = 0) -> torch.Tensor:
    """(len(keys),) integers in [0, high); entry i depends only on (seed, step, salt, keys[i])."""
    return torch.cat([torch.randint(0, high, (1,), generator=_generator(seed, step, salt, k)) for k in keys])
