"""Training methods by name: each factory turns (recipe, pipeline, accelerator) into a Method.

    METHODS["dpo"](recipe, pipe, accelerator) -> Method
Factories import their modules lazily, so choosing a method imports only what it needs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from deradiff.trainer import Method


def make_dpo(recipe, pipe, accelerator) -> Method:
    """Diffusion-DPO on Pick-a-Pic-format preference pairs; reference = LoRA disabled."""
    from deradiff.conditioning import encode_prompts
    from deradiff.data import load_preference_dataset
    from deradiff.dpo import dpo_step

    dataset, stats = load_preference_dataset(recipe.data, seed=recipe.trainer.seed)
    accelerator.print(f"preference pairs: {stats}")
    m = recipe.method
    device = accelerator.device

    def collate(rows: list[dict], ids: list[int]) -> dict:
        batch = {
            "pixel_values_w": torch.stack([r["pixel_values_w"] for r in rows]),
            "pixel_values_l": torch.stack([r["pixel_values_l"] for r in rows]),
            "captions": [r["caption"] for r in rows],
            "ids": ids,
        }
        if "original_size" in rows[0]:
            batch["original_sizes"] = torch.tensor([list(r["original_size"]) for r in rows])
            batch["crops_top_left"] = torch.tensor([list(r["crop_top_left"]) for r in rows])
        return batch

    def step(unet, batch: dict, step_index: int, epoch: int):
        reference = accelerator.unwrap_model(unet)
        cond = encode_prompts(pipe, batch["captions"], device, recipe.data.resolution,
                              batch.get("original_sizes"), batch.get("crops_top_left"))
        with accelerator.autocast():
            return dpo_step(unet, reference, pipe.vae, pipe.scheduler, batch["pixel_values_w"].to(device),
                            batch["pixel_values_l"].to(device), cond, beta=m.beta, convention=m.beta_convention,
                            pair_ids=batch["ids"], seed=recipe.trainer.seed, epoch=epoch)

    describe = (f"beta={m.beta:g} ({m.beta_convention} convention: loss = -log sigmoid(-"
                f"{'beta/2' if m.beta_convention == 'official' else 'beta'} * margin difference))")
    return Method("dpo", dataset, collate, step, describe)


def _lazy(module: str, name: str) -> Callable:
    def factory(recipe, pipe, accelerator) -> Method:
        import importlib

        return getattr(importlib.import_module(module), name)(recipe, pipe, accelerator)

    return factory


METHODS: dict[str, Callable] = {
    "dpo": make_dpo,
}
