"""Benchmark: where the mixed batch's time goes, and the floor for any one-batch realignment.

    OMP_NUM_THREADS=2 python benchmarks/realign_floor.py   # table + benchmarks/results/realign_floor.json
                    # 8 min on 2 nearly idle cores (load 0.2-2); 40 min when other jobs hold them (load 4)
    OMP_NUM_THREADS=1 python benchmarks/realign_floor.py --width 16 --shapes 1x8 2x8 --repeats 3 \\
        --threads 1 --no-profile --out /tmp/floor.json     # smoke test, under a minute

The denoiser alone, called as a pipeline calls it at one sampling step (no pipeline, no
scheduler): benchmarks/realign.py's UNet (--width 128: 35M params, random rank-8 LoRA on
attention and proj_in/out, 110 LoRA layers), inputs of `rows` rows at a latent side. A pipeline
call of B images hands the denoiser rows = B, or 2 B under classifier-free guidance (the toy
sampler's default, CFG 3); mixed_batch then runs 2 x rows. --shapes ROWSxSIDE: 1x8 is
benchmarks/realign.py at batch 1, 2x8 the same with CFG, 4x8 its batch 4, 8x8 batch 4 with CFG.

Arms, each one "step" (what one realigned denoiser call costs), on the same inputs:
  floor         plain_two_calls   UNet with no LoRA layers (LoRA unloaded), two calls of rows
                plain_one_call    the same UNet, one call of 2 x rows: what any one-batch method
                                  can at best reach (ratio to plain_two_calls = the floor)
  LoRA cost     lora_off          LoRA UNet, adapter disabled, rows (two_forward's reference)
                lora_on           LoRA UNet, adapter on, rows (two_forward's aligned call)
                lora_on_double    adapter on for all 2 x rows, no routing: one batch's LoRA cost
  realignment   two_forward       RealignedDenoiser(mode="two_forward"), lam 0.5
  (same mix)    two_forward_merged  reference with the adapter off, aligned with W + s B A swapped
                                  into the LoRA layers' base weights (kept precomputed, swapped by
                                  reference: no merge/unmerge arithmetic, exact restore)
                mixed_batch       RealignedDenoiser(mode="mixed_batch"): deradiff.routing's
                                  routing, one batched matmul per LoRA layer against precomputed
                                  stacked [W; W + s B A] (as many ops as the plain UNet)
                mixed_peft        the same call routed by peft's per-row routing (adapter_names
                                  with "__base__"; per layer: a Python scan of the names,
                                  x[index list] gather, result[index list] += scatter), which
                                  mixed_batch used before deradiff.routing
                mixed_slice       RealignedDenoiser(mode="mixed_batch", stack_weights=False):
                                  deradiff.routing's sliced route, each LoRA layer adds
                                  s B A x[n:] to out[n:] (contiguous views: no index lists, no
                                  weight copies; the default on accelerators)
                mixed_mask        each LoRA layer adds m * s B A x, m a per-row 0/1 mask
                mixed_merged      each LoRA layer computes x[:n] W^T and x[n:] (W + s B A)^T
                                  (precomputed merged weights) and concatenates
mixed_peft, mixed_mask and mixed_merged are RealignedDenoiser with `_mixed_forward` routed by
`routed_rows` below instead of deradiff.routing. Arms are interleaved (rotated order each
repeat, so drifting load hits all alike), times are medians over repeats, ratios are taken
within the run. Every realignment arm's output (the lam 0.5 mix, and aligned - reference from a
recorded call) is checked against two_forward (max abs difference). A torch.profiler pass
counts aten ops per arm call (nested ones included) and sums self CPU time by op at the first
shape: the op-count and kernel-choice story behind the ratios. The JSON records the load
average before and after. CPU only (the models and inputs are built on the CPU).
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from common import write_results

FLOOR_ARMS = ("plain_two_calls", "plain_one_call")
LORA_ARMS = ("lora_off", "lora_on", "lora_on_double")
MIX_ARMS = ("two_forward", "two_forward_merged", "mixed_batch", "mixed_peft", "mixed_slice", "mixed_mask",
            "mixed_merged")
ARMS = FLOOR_ARMS + LORA_ARMS + MIX_ARMS
ROUTINGS = ("peft", "mask", "merged")  # mixed_slice: deradiff.routing's sliced route
LAM = 0.5
TIMESTEP = 500


# -- routing for the 2-group mixed batch: [reference rows; aligned rows] ---------------------------

def _lora_parts(layer, adapter: str):
    """(lora_A, lora_B, dropout, scaling) of one peft LoRA layer for `adapter`."""
    return layer.lora_A[adapter], layer.lora_B[adapter], layer.lora_dropout[adapter], layer.scaling[adapter]


def _mask_forward(layer, adapter: str, n: int, masks: dict, **_) -> Callable:
    """base(x) + m * s B A x, m = 0 on rows :n and 1 on rows n: (LoRA on every row);
    masks: {ndim: the row mask shaped to broadcast over one row}."""
    lora_a, lora_b, dropout, scaling = _lora_parts(layer, adapter)
    base = layer.base_layer

    def forward(x, *args, **kwargs):
        out = base(x, *args, **kwargs)
        return out + masks[out.ndim] * (lora_b(lora_a(dropout(x))) * scaling)
    return forward


def _merged_forward(layer, adapter: str, n: int, prepared: dict, **_) -> Callable:
    """cat(x[:n] W^T, x[n:] W'^T), W' = prepared[layer] = W + s B A precomputed (Linear, Conv2d)."""
    import torch
    import torch.nn.functional as F

    base, weight = layer.base_layer, prepared[layer]
    if isinstance(base, torch.nn.Conv2d):
        def apply(x, w):
            return base._conv_forward(x, w, base.bias)
    else:
        def apply(x, w):
            return F.linear(x, w, base.bias)

    def forward(x, *args, **kwargs):
        return torch.cat([apply(x[:n], base.weight), apply(x[n:], weight)])
    return forward


ROUTE_FORWARDS = {"mask": _mask_forward, "merged": _merged_forward}


def merged_lora_weights(layers) -> dict:
    """{peft LoRA layer: W + s B A of its active adapter, a frozen Parameter}: memory for one more
    copy of every LoRA-targeted weight."""
    import torch

    return {m: torch.nn.Parameter(m.base_layer.weight.detach() + m.get_delta_weight(m.active_adapters[0]),
                                  requires_grad=False) for m in layers}


PREPARE = {"merged": merged_lora_weights}


@contextmanager
def routed_rows(layers, adapter: str, n: int, routing: str, prepared: dict | None = None) -> Iterator[None]:
    """Every peft LoRA layer in `layers` applies `adapter` to batch rows n: only, for a batch of
    2 n rows (routing: "peft" (peft's adapter_names, by a pre-hook) or a ROUTE_FORWARDS key, by
    an instance `forward` removed afterwards; merged needs PREPARE[routing](layers) as `prepared`)."""
    import torch
    from peft.tuners.lora import LoraLayer

    from deradiff.routing import RESERVED_ADAPTER, _names_injector

    lora = [m for m in layers if isinstance(m, LoraLayer)]
    if routing == "peft":
        inject = _names_injector([RESERVED_ADAPTER] * n + [adapter] * n)
        hooks = [layer.register_forward_pre_hook(inject, with_kwargs=True) for layer in lora]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
        return
    rows = torch.cat([torch.zeros(n), torch.ones(n)])
    masks = {ndim: rows.view(-1, *([1] * (ndim - 1))) for ndim in (2, 3, 4)}
    for layer in lora:
        layer.forward = ROUTE_FORWARDS[routing](layer, adapter, n, masks=masks, prepared=prepared)
    try:
        yield
    finally:
        for layer in lora:
            del layer.forward


def routed_denoiser_class():
    """RealignedDenoiser(routing=...) whose mixed batch is routed by `routed_rows` instead of
    peft's adapter_names."""
    from deradiff.realign import (
        RealignedDenoiser,
        _first_tensor,
        _repeat_call,
        _replace_first_tensor,
        _single_active_adapter,
    )

    class RoutedDenoiser(RealignedDenoiser):
        def __init__(self, *args, routing: str = "mask", **kwargs):
            super().__init__(*args, mode="mixed_batch", **kwargs)
            self.routing = routing
            self.prepared = PREPARE[routing](self._layers) if routing in PREPARE else None

        def _mixed_forward(self, batch):
            n = batch.size
            args, kwargs = _repeat_call(batch.args, batch.kwargs, n, 2, self._arg_names)
            adapter = _single_active_adapter(self._layers)
            with routed_rows(self._layers, adapter, n, self.routing, self.prepared):
                out = self.aligned(*args, **kwargs)
            both = _first_tensor(out)
            return _replace_first_tensor(out, both[:n]), _replace_first_tensor(out, both[n:])
    return RoutedDenoiser


@contextmanager
def merged_weights(model, layers, merged: dict) -> Iterator[None]:
    """The LoRA layers' base weights replaced by merged_lora_weights (by reference), the adapter
    path off; the original weight objects put back afterwards."""
    from deradiff.models import adapters_disabled

    saved = {layer: layer.base_layer.weight for layer in merged}
    for layer, weight in merged.items():
        layer.base_layer.weight = weight
    try:
        with adapters_disabled(model, layers):
            yield
    finally:
        for layer, weight in saved.items():
            layer.base_layer.weight = weight


# -- the arms ---------------------------------------------------------------------------------------

def build_models(width: int):
    """(lora_unet, plain_unet, layers, merged): benchmarks/realign.py's UNet with its random LoRA,
    a deep copy with the LoRA unloaded (no peft layers), the LoRA UNet's tuner layers and
    merged_lora_weights of them."""
    from realign import build_unet

    from deradiff.models import tuner_layers

    lora_unet = build_unet(width).unet
    plain = copy.deepcopy(lora_unet)
    plain.unload_lora()
    layers = tuner_layers(lora_unet)
    return lora_unet.eval(), plain.eval(), layers, merged_lora_weights(layers)


def make_inputs(unet, rows: int, side: int, seed: int = 0):
    """(sample (rows, 4, side, side), timestep 0-d, encoder_hidden_states (rows, 48, cross dim))."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    sample = torch.randn(rows, unet.config.in_channels, side, side, generator=gen)
    context = torch.randn(rows, 48, unet.config.cross_attention_dim, generator=gen)
    return sample, torch.tensor(TIMESTEP), context


def make_arms(lora_unet, plain, layers, merged, inputs) -> dict[str, Callable]:
    """{arm: zero-argument call doing one step's work} (see the module docstring)."""
    import torch

    from deradiff.models import adapters_disabled
    from deradiff.realign import RealignedDenoiser, _repeat_call

    sample, t, context = inputs
    n = sample.shape[0]
    (d_sample, _, d_context), _ = _repeat_call((sample, t, context), {}, n, 2, None)
    routed = routed_denoiser_class()

    def unet_call(model, x, c):
        return model(x, t, encoder_hidden_states=c, return_dict=False)[0]

    def denoiser(cls=RealignedDenoiser, **kw):
        d = cls(lora_unet, lam=LAM, record=False, **kw)
        return lambda: d(sample, t, encoder_hidden_states=context, return_dict=False)[0]

    def lora_off():
        with adapters_disabled(lora_unet, layers):
            return unet_call(lora_unet, sample, context)

    def two_forward_merged():
        ref = lora_off()
        with merged_weights(lora_unet, layers, merged):
            aligned = unet_call(lora_unet, sample, context)
        return (1.0 - LAM) * ref + LAM * aligned

    arms = {
        "plain_two_calls": lambda: (unet_call(plain, sample, context), unet_call(plain, sample, context)),
        "plain_one_call": lambda: unet_call(plain, d_sample, d_context),
        "lora_off": lora_off,
        "lora_on": lambda: unet_call(lora_unet, sample, context),
        "lora_on_double": lambda: unet_call(lora_unet, d_sample, d_context),
        "two_forward": denoiser(mode="two_forward"),
        "two_forward_merged": two_forward_merged,
        "mixed_batch": denoiser(mode="mixed_batch", stack_weights=True),
        "mixed_slice": denoiser(mode="mixed_batch", stack_weights=False),
        **{f"mixed_{r}": denoiser(routed, routing=r) for r in ROUTINGS},
    }
    arms = {name: arms[name] for name in ARMS}
    return {name: torch.no_grad()(fn) for name, fn in arms.items()}


def check_outputs(lora_unet, inputs, arms: dict[str, Callable]) -> dict[str, dict]:
    """Max |difference| to two_forward of every realignment arm's lam 0.5 mix, and of its
    aligned - reference (read from a recorded call; only for RealignedDenoiser arms)."""
    import torch

    from deradiff.realign import RealignedDenoiser

    sample, t, context = inputs
    reference = arms["two_forward"]()

    def recorded_delta(cls=RealignedDenoiser, **kw):
        d = cls(lora_unet, lam=LAM, record=True, **kw)
        with torch.no_grad():
            d(sample, t, encoder_hidden_states=context, return_dict=False)
        return d.records[-1].delta

    routed = routed_denoiser_class()
    deltas = {"two_forward": recorded_delta(mode="two_forward"),
              "mixed_batch": recorded_delta(mode="mixed_batch", stack_weights=True),
              "mixed_slice": recorded_delta(mode="mixed_batch", stack_weights=False),
              **{f"mixed_{r}": recorded_delta(routed, routing=r) for r in ROUTINGS}}
    checks = {}
    for name in MIX_ARMS:
        entry = {"mix_max_abs_diff": float((arms[name]() - reference).abs().max())}
        if name in deltas:
            entry["delta_max_abs_diff"] = float((deltas[name] - deltas["two_forward"]).abs().max())
        checks[name] = entry
    checks["output_max_abs"] = float(reference.abs().max())
    checks["delta_max_abs"] = float(deltas["two_forward"].abs().max())
    return checks


# -- measurement ------------------------------------------------------------------------------------

def time_arms(arms: dict[str, Callable], repeats: int) -> dict[str, float]:
    """Median seconds per call of each arm; arms interleaved, their order rotated each repeat."""
    names = list(arms)
    times: dict[str, list[float]] = {name: [] for name in names}
    for name in names:  # warm-up (allocator, kernel choice)
        arms[name]()
    for r in range(repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            arms[name]()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) for name, v in times.items()}


def profile_arms(arms: dict[str, Callable], names: tuple[str, ...], calls: int = 3, top: int = 12) -> dict[str, dict]:
    """Per arm, per call under torch.profiler: aten ops launched (nested ones included), wall
    ms, self CPU ms summed over aten ops (wall minus it: Python and dispatch outside any aten op),
    and the `top` costliest ops by self CPU time as {op: [calls, self ms]}."""
    from torch.profiler import ProfilerActivity, profile

    out = {}
    for name in names:
        arms[name]()
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(calls):
                arms[name]()
            wall = (time.perf_counter() - start) / calls
        events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
        costly = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        out[name] = {"aten_ops_per_call": sum(e.count for e in events) / calls, "wall_ms_per_call": wall * 1e3,
                     "aten_self_ms_per_call": sum(e.self_cpu_time_total for e in events) / 1e3 / calls,
                     "top_ops": {e.key: [e.count / calls, e.self_cpu_time_total / 1e3 / calls] for e in costly}}
    return out


def ratios(t: dict[str, float]) -> dict[str, float]:
    """The ratios the table prints (see report)."""
    return {
        "floor_one_call_vs_two_calls": t["plain_one_call"] / t["plain_two_calls"],
        "lora_on_vs_plain_call": t["lora_on"] / (t["plain_two_calls"] / 2),
        "lora_off_vs_plain_call": t["lora_off"] / (t["plain_two_calls"] / 2),
        "lora_on_double_vs_plain_one_call": t["lora_on_double"] / t["plain_one_call"],
        "two_forward_vs_plain_two_calls": t["two_forward"] / t["plain_two_calls"],
        "two_forward_merged_vs_plain_two_calls": t["two_forward_merged"] / t["plain_two_calls"],
        **{f"{a}_vs_two_forward": t[a] / t["two_forward"] for a in MIX_ARMS[1:]},
        "mixed_batch_vs_mixed_peft": t["mixed_batch"] / t["mixed_peft"],
        "mixed_peft_vs_lora_on_double": t["mixed_peft"] / t["lora_on_double"],
        **{f"{a}_vs_plain_one_call": t[a] / t["plain_one_call"] for a in MIX_ARMS[2:]},
    }


def measure_shape(models, rows: int, side: int, repeats: int, profile: bool) -> dict:
    lora_unet, plain, layers, merged = models
    inputs = make_inputs(lora_unet, rows, side)
    arms = make_arms(lora_unet, plain, layers, merged, inputs)
    checks = check_outputs(lora_unet, inputs, arms)
    times = time_arms(arms, repeats)
    result = {"rows": rows, "latent_side": side, "ms_per_call": {k: v * 1e3 for k, v in times.items()},
              "ratios": ratios(times), "checks": checks}
    if profile:
        result["profile"] = profile_arms(arms, ARMS)
    print(f"{rows}x{side}: mixed_batch / two_forward {result['ratios']['mixed_batch_vs_two_forward']:.3f}, "
          f"floor {result['ratios']['floor_one_call_vs_two_calls']:.3f}", file=sys.stderr, flush=True)
    return result


def report(args, shapes: list[dict], setup: dict) -> None:
    """The table on stdout: ms per step, and the ratios of the floor, LoRA and routing."""
    print(f"UNet {setup['unet_params_m']:.1f}M params, {setup['lora_layers']} LoRA layers (rank 8), "
          f"{args.threads} threads, load {setup['loadavg_1m_before_after'][0]:.2f} -> "
          f"{setup['loadavg_1m_before_after'][1]:.2f}; ms per step (median of {args.repeats})")
    print(f"{'arm':<22}" + "".join(f"{s['rows']:>5}x{s['latent_side']:<4}" for s in shapes))
    for arm in ARMS:
        print(f"{arm:<22}" + "".join(f"{s['ms_per_call'][arm]:>10.1f}" for s in shapes))
    print("ratios")
    for key in shapes[0]["ratios"]:
        print(f"{key:<40}" + "".join(f"{s['ratios'][key]:>8.3f}" for s in shapes))
    worst = max(c["mix_max_abs_diff"] for s in shapes for k, c in s["checks"].items() if isinstance(c, dict))
    print(f"every realignment arm agrees with two_forward to {worst:.1e} (max abs, outputs up to "
          f"{max(s['checks']['output_max_abs'] for s in shapes):.2f})")
    if "profile" in shapes[0]:
        print(f"under torch.profiler at {shapes[0]['rows']}x{shapes[0]['latent_side']}: aten ops per call, wall ms, "
              "ms outside aten ops")
        for name, v in shapes[0]["profile"].items():
            print(f"  {name:<22}{v['aten_ops_per_call']:>8.0f}{v['wall_ms_per_call']:>9.1f}"
                  f"{v['wall_ms_per_call'] - v['aten_self_ms_per_call']:>9.1f}")


def _shape(text: str) -> tuple[int, int]:
    try:
        rows, side = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write ROWSxSIDE, e.g. 2x8") from None
    if rows <= 0 or side <= 0 or side % 4:
        raise argparse.ArgumentTypeError(f"{text!r}: rows > 0 and a latent side that is a multiple of 4")
    return rows, side


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=128, help="UNet base width, a multiple of 16 (128: 35M params)")
    p.add_argument("--shapes", type=_shape, nargs="+", default=[(1, 8), (2, 8), (4, 8), (8, 8), (2, 16), (8, 16)],
                   help="ROWSxSIDE: rows per denoiser call (images, x 2 with CFG) and latent side")
    p.add_argument("--repeats", type=int, default=21, help="timed calls per arm and shape (median)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip the torch.profiler pass")
    p.add_argument("--out", default="benchmarks/results/realign_floor.json")
    args = p.parse_args(argv)
    if args.width <= 0 or args.width % 16:
        p.error(f"--width {args.width} is not a positive multiple of 16")
    import torch

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    models = build_models(args.width)
    shapes = [measure_shape(models, rows, side, args.repeats, args.profile and i == 0)
              for i, (rows, side) in enumerate(args.shapes)]
    from realign import _cpu_model

    setup = {"unet_params_m": sum(p.numel() for p in models[1].parameters()) / 1e6, "lora_layers": len(models[2]),
             "torch": torch.__version__, "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
             "torch_threads": args.threads, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
             "loadavg_1m_before_after": [load_before[0], os.getloadavg()[0]]}
    report(args, shapes, setup)
    summary = {f"{s['rows']}x{s['latent_side']}": s["ratios"] for s in shapes}
    args.shapes = [f"{r}x{s}" for r, s in args.shapes]
    write_results(args.out, args, shapes, summary, setup=setup)
    return 0


if __name__ == "__main__":
    sys.exit(main())
