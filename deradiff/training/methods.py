"""Training methods by name: each factory turns (recipe, pipeline, accelerator) into a Method.

    METHODS["dpo"](recipe, pipe, accelerator) -> Method
Factories import their modules lazily, so choosing a method imports only what it needs.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from deradiff.training.trainer import Method


def make_dpo(recipe, pipe, accelerator) -> Method:
    """Diffusion-DPO on Pick-a-Pic-format preference pairs; reference = LoRA disabled."""
    from deradiff.training.conditioning import encode_prompts
    from deradiff.training.data import collate_pairs, load_preference_dataset
    from deradiff.training.dpo import dpo_errors, dpo_settings
    from deradiff.training.recipe_checks import prefs_hint

    hint = prefs_hint(recipe)
    device = accelerator.device
    settings = dpo_settings(recipe, pipe)  # family checked; flow sigma sampling
    if recipe.data.latent_cache:
        return _cached_dpo(recipe, pipe, accelerator, settings)
    dataset, stats = load_preference_dataset(recipe.data, seed=recipe.trainer.seed, rank=accelerator.process_index,
                                             world_size=accelerator.num_processes, hint=hint)
    accelerator.print(f"preference pairs: {'streamed, counted as they arrive' if recipe.data.streaming else stats}")

    def collate(rows: list[dict], ids: list[int]) -> dict:
        return {**collate_pairs(rows), "ids": ids}

    def errors(unet, batch: dict, epoch: int):
        reference = accelerator.unwrap_model(unet)
        cond = encode_prompts(pipe, batch["captions"], device, recipe.data.resolution,
                              batch.get("original_sizes"), batch.get("crops_top_left"),
                              **settings.encode_kwargs)
        with accelerator.autocast():
            return dpo_errors(unet, reference, pipe.vae, pipe.scheduler, batch["pixel_values_w"].to(device),
                              batch["pixel_values_l"].to(device), cond, pair_ids=batch["ids"],
                              seed=recipe.trainer.seed, epoch=epoch, sampling=settings.sampling,
                              split_backward=recipe.model.split_backward)

    eval_set = None
    if recipe.data.eval_path or recipe.data.eval_split:
        eval_set, eval_stats = load_preference_dataset(recipe.data, which="eval", seed=recipe.trainer.seed, hint=hint)
        if not hasattr(eval_set, "__len__"):
            eval_set = list(eval_set)  # held-out pairs are few (data.max_eval_samples): read them once
        accelerator.print(f"held-out pairs: {eval_stats}")
    return _dpo_method(recipe, accelerator, settings, dataset, collate, errors, eval_set)


def _cached_dpo(recipe, pipe, accelerator, settings) -> Method:
    """Diffusion-DPO from a latent cache (deradiff.training.cache): the pairs' VAE posteriors and
    caption embeddings are read, not computed; the losses are the uncached run's to float tolerance."""
    from deradiff.training.cache import cached_conditioning, cached_latents, collate_cached, open_cache
    from deradiff.training.dpo import dpo_errors_from_latents
    from deradiff.training.reference_errors import agreement, open_store

    cache = open_cache(recipe)
    store = open_store(recipe, cache, pipe.scheduler, accelerator.process_index, accelerator.print)
    agree = agreement(accelerator)
    seed, device = recipe.trainer.seed, accelerator.device
    dataset = cache.pairs("train", seed, recipe.data.random_flip)
    eval_set = cache.pairs("eval", seed, False) if (recipe.data.eval_path or recipe.data.eval_split) else None
    accelerator.print(f"preference pairs: {len(dataset)} from the latent cache {cache.folder}"
                      + (f", {len(eval_set)} held-out" if eval_set is not None else ""))

    def collate(rows: list[dict], ids: list[int]) -> dict:
        return {**collate_cached(rows), "ids": ids}

    def errors(unet, batch: dict, epoch: int):
        latents = cached_latents(batch, batch["ids"], seed, epoch, cache.scaling_factor, cache.shift_factor, device)
        cond = cached_conditioning(batch, recipe.model.kind, recipe.data.resolution, device)
        stored = store.lookup(batch["ids"], epoch, agree) if store is not None else None
        with accelerator.autocast():
            errs = dpo_errors_from_latents(unet, accelerator.unwrap_model(unet), pipe.scheduler, latents, cond,
                                           pair_ids=batch["ids"], seed=seed, epoch=epoch, sampling=settings.sampling,
                                           ref_errors=stored, split_backward=recipe.model.split_backward)
        if store is not None and stored is None:
            store.add(batch["ids"], epoch, errs[2], errs[3])
        return errs

    return _dpo_method(recipe, accelerator, settings, dataset, collate, errors, eval_set, store)


def _dpo_method(recipe, accelerator, settings, dataset, collate, errors, eval_set, store=None) -> Method:
    """The DPO Method around a pair dataset and an `errors(unet, batch, epoch)` function; `store`:
    the stored reference errors that `errors` reads and fills (deradiff.training.reference_errors)."""
    from deradiff.training.losses import diffusion_dpo_loss, dpo_logits, implicit_accuracy

    m, t = recipe.method, recipe.trainer
    device = accelerator.device

    def step(unet, batch: dict, step_index: int, micro: int, epoch: int):
        out = diffusion_dpo_loss(*errors(unet, batch, epoch), beta=m.beta, convention=m.beta_convention)
        if store is not None and micro == t.gradient_accumulation - 1:  # write where a resume restarts
            done = step_index + 1
            store.maybe_flush(force=done % t.checkpoint_every == 0 or done >= t.max_steps)
        return out

    @torch.no_grad()
    def evaluate(unet) -> dict[str, float]:
        """Held-out DPO metrics, this rank's share, averaged over ranks: each pair at
        method.eval_draws fixed (timestep, noise) draws (epoch keys -1, -2, ...); eval/dpo/* are
        means over pairs and draws, eval/dpo/ranking_acc the implicit accuracy of the
        draw-averaged margin (the model's implicit reward, E_t,noise, estimated per pair)."""
        rows = list(range(accelerator.process_index, len(eval_set), accelerator.num_processes))
        size = recipe.trainer.per_device_batch_size
        sums: dict[str, float] = {"dpo/ranking_acc": 0.0}
        for start in range(0, len(rows), size):
            ids = rows[start:start + size]
            batch = collate([eval_set[i] for i in ids], ids)
            margin = torch.zeros(len(ids), dtype=torch.float64, device=device)
            for draw in range(m.eval_draws):
                errs = errors(unet, batch, -1 - draw)
                margin += dpo_logits(*errs).double()
                _, metrics = diffusion_dpo_loss(*errs, beta=m.beta, convention=m.beta_convention)
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + v * len(ids) / m.eval_draws
            sums["dpo/ranking_acc"] += float(implicit_accuracy(margin).sum())
        if store is not None:
            store.flush()  # every evaluation draws the same held-out errors: the next one reads them
        keys = sorted(sums)
        totals = torch.tensor([sums[k] for k in keys] + [len(rows)], dtype=torch.float64, device=device)
        totals = accelerator.reduce(totals, reduction="sum")
        return {f"eval/{k}": float(v / totals[-1]) for k, v in zip(keys, totals[:-1].tolist(), strict=True)}

    describe = (f"beta={m.beta:g} ({m.beta_convention} convention: loss = -log sigmoid(-"
                f"{'beta/2' if m.beta_convention == 'official' else 'beta'} * margin difference)); "
                f"{settings.describe()}")
    if recipe.model.split_backward:
        describe += "; model.split_backward: each image's forward and backward on its own"
    data_stats = _pair_counts(dataset, accelerator)
    if store is not None:
        from deradiff.training.reference_errors import store_counts

        describe += f"; reference errors stored in {store.folder}"
        pair_counts = data_stats

        def data_stats() -> dict[str, float]:
            return {**pair_counts(), **store_counts(store, accelerator)}

    return Method("dpo", dataset, collate, step, describe, evaluate if eval_set is not None else None,
                  data_stats=data_stats, parallel_data=True)


def _pair_counts(dataset, accelerator) -> Callable[[], dict[str, float]]:
    """data_stats() -> data/* counts of the training pairs over all processes: a streamed set's
    counts summed over the ranks' shards; an indexed set's filtering counts (the same on every
    rank) with the corrupt rows found while training united over ranks."""

    def data_stats() -> dict[str, float]:
        if hasattr(dataset, "metrics"):  # indexed: every rank holds the whole filtered set
            bad = dataset.bad_rows
            if accelerator.num_processes > 1:
                from accelerate.utils import gather_object

                bad = set(gather_object(sorted(bad)))
            return dataset.metrics(bad)
        counts = dataset.stats.as_metrics()
        if accelerator.num_processes == 1:
            return counts
        values = torch.tensor(list(counts.values()), dtype=torch.float64, device=accelerator.device)
        total = accelerator.reduce(values, reduction="sum").tolist()
        return dict(zip(counts, total, strict=True))

    return data_stats


def _lazy(module: str, name: str) -> Callable:
    def factory(recipe, pipe, accelerator) -> Method:
        import importlib

        return getattr(importlib.import_module(module), name)(recipe, pipe, accelerator)

    return factory


METHODS: dict[str, Callable] = {
    "dpo": make_dpo,
    "kl_grad": _lazy("deradiff.training.kl", "make_kl_grad"),
    "kl_pg": _lazy("deradiff.training.kl", "make_kl_pg"),
}
