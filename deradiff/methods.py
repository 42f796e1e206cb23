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
    from deradiff.data import collate_pairs, load_preference_dataset
    from deradiff.dpo import dpo_step

    dataset, stats = load_preference_dataset(recipe.data, seed=recipe.trainer.seed)
    accelerator.print(f"preference pairs: {stats}")
    m = recipe.method
    device = accelerator.device

    def collate(rows: list[dict], ids: list[int]) -> dict:
        return {**collate_pairs(rows), "ids": ids}

    def step(unet, batch: dict, step_index: int, epoch: int):
        reference = accelerator.unwrap_model(unet)
        cond = encode_prompts(pipe, batch["captions"], device, recipe.data.resolution,
                              batch.get("original_sizes"), batch.get("crops_top_left"))
        with accelerator.autocast():
            return dpo_step(unet, reference, pipe.vae, pipe.scheduler, batch["pixel_values_w"].to(device),
                            batch["pixel_values_l"].to(device), cond, beta=m.beta, convention=m.beta_convention,
                            pair_ids=batch["ids"], seed=recipe.trainer.seed, epoch=epoch)

    eval_set = None
    if recipe.data.eval_path or recipe.data.eval_split:
        eval_set, eval_stats = load_preference_dataset(recipe.data, which="eval", seed=recipe.trainer.seed)
        accelerator.print(f"held-out pairs: {eval_stats}")

    @torch.no_grad()
    def evaluate(unet) -> dict[str, float]:
        """Held-out DPO metrics with fixed noise (epoch key -1), this rank's share, averaged over ranks."""
        rows = list(range(accelerator.process_index, len(eval_set), accelerator.num_processes))
        size = recipe.trainer.per_device_batch_size
        sums: dict[str, float] = {}
        for start in range(0, len(rows), size):
            ids = rows[start:start + size]
            _, metrics = step(unet, collate([eval_set[i] for i in ids], ids), -1, -1)
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + v * len(ids)
        keys = sorted(sums)
        totals = torch.tensor([sums[k] for k in keys] + [len(rows)], dtype=torch.float64, device=device)
        totals = accelerator.reduce(totals, reduction="sum")
        return {f"eval/{k}": float(v / totals[-1]) for k, v in zip(keys, totals[:-1].tolist(), strict=True)}

    describe = (f"beta={m.beta:g} ({m.beta_convention} convention: loss = -log sigmoid(-"
                f"{'beta/2' if m.beta_convention == 'official' else 'beta'} * margin difference))")
    return Method("dpo", dataset, collate, step, describe, evaluate if eval_set is not None else None)


def _lazy(module: str, name: str) -> Callable:
    def factory(recipe, pipe, accelerator) -> Method:
        import importlib

        return getattr(importlib.import_module(module), name)(recipe, pipe, accelerator)

    return factory


METHODS: dict[str, Callable] = {
    "dpo": make_dpo,
    "kl_grad": _lazy("deradiff.kl", "make_kl_grad"),
    "kl_pg": _lazy("deradiff.kl", "make_kl_pg"),
}
