"""The salts of the keyed random draws: named in deradiff.seeding, values unchanged, distinct."""

from __future__ import annotations

import torch

from deradiff import seeding
from deradiff.training.data import pair_generator


def test_salts_keep_the_values_runs_were_made_with_and_never_collide():
    assert (seeding.SALT_DPO_VAE, seeding.SALT_DPO_NOISE, seeding.SALT_DPO_TIMESTEP) == (1, 3, 4)
    assert (seeding.SALT_ROLLOUT_INIT, seeding.SALT_ROLLOUT_STEP) == (10, 11)
    assert (seeding.SALT_KL_STEPS, seeding.SALT_PG_TIMESTEPS) == (1 << 30, (1 << 30) + 1)
    fixed = [seeding.SALT_DPO_VAE, seeding.SALT_DPO_NOISE, seeding.SALT_DPO_TIMESTEP, seeding.SALT_DPO_SIGMA,
             seeding.SALT_ROLLOUT_INIT, seeding.SALT_KL_STEPS, seeding.SALT_PG_TIMESTEPS]
    steps = range(seeding.SALT_ROLLOUT_STEP, seeding.SALT_ROLLOUT_STEP + 10_000)  # one salt per sampling step
    assert len(set(fixed)) == len(fixed) and not set(fixed) & set(steps)


def test_the_pair_augmentation_generator_is_the_keyed_generator_of_before():
    def before(seed: int, epoch: int, index: int) -> torch.Generator:  # the formula data.py used
        key = seed & 0xFFFFFFFF
        for k in (epoch, index):
            key = (key * 6364136223846793005 + (int(k) & 0xFFFFFFFF) + 1442695040888963407) % (1 << 63)
        return torch.Generator().manual_seed(key)

    for args in ((0, 0, 0), (7, 3, 12345), (2**40 + 5, -1, 9)):
        assert torch.equal(torch.rand(4, generator=pair_generator(*args)), torch.rand(4, generator=before(*args)))
