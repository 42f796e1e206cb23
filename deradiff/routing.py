"""Row-group routing: one call of a peft-LoRA model on a batch of G blocks of n rows, where
block g runs as the base model with adapter names[g] alone (None: no adapter at all).

Realignment's mixed batch (deradiff.realign, mode="mixed_batch") is G = 2 (reference rows, then
aligned rows), or 1 + K for a lambda vector over K adapters.

Two routes per plain LoRA layer (nn.Linear or nn.Conv2d base), chosen by `stack_weights`:

- stacked (stack_weights=True; the default on CPU): every Linear and 1x1 Conv2d layer (SD1.5's
  proj_in/proj_out) computes its G blocks in ONE batched matmul against the stacked weights
  [W_1; ...; W_G], W_g = W + s_g B_g A_g (W itself for a block without adapter): as many ops per
  layer as the plain model. Memory: G copies of every stacked layer's weight while the router
  lives (realign.RealignedDenoiser keeps one per denoiser, so per pipeline call in
  deradiff.evaluation), built on first use and rebuilt whenever an adapter's weights or scaling,
  or the base weight, change (tensor data pointers and version counters are the key). The merged
  weights are rounded to the base weight's dtype, as fusing a LoRA is; in fp32 the mix agrees
  with peft's routing to ~1e-6.
- sliced (stack_weights=False; the default on accelerators, where weights are large and memory
  scarce; and k x k convolutions on any device): the base layer on all rows, then s_g B_g A_g x_g
  added to block g's rows in place, each block a contiguous view: no weight copies, two small
  matmuls per adapted block.

peft's own per-row routing (the `adapter_names` argument) instead scans the row names in Python
and runs a gather, two LoRA matmuls and a scatter-add per layer and adapter, which is what kept
the mixed batch at 0.75-0.80x of two forwards where calls are launch-bound
(benchmarks/realign_floor.py at 1-4 rows: stacked 0.58-0.66x, sliced 0.67-0.74x). It is kept for what the
two routes do not reproduce: DoRA and other peft LoRA variants, LoRA bias, base types other than
nn.Linear / nn.Conv2d (quantized ones included), merged adapters, dropout active in train mode,
accelerate offload hooks, and every layer while autograd is on (the routes are for sampling;
gradients reach the LoRA through peft's path).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

# peft's mixed-batch routing reserves "__base__" for rows without any adapter.
RESERVED_ADAPTER = "__base__"


@dataclass
class RouteCounts:
    """How many LoRA layers one `route` block sent each way."""

    stacked: int = 0  # one batched matmul against stacked merged weights
    sliced: int = 0  # the base layer on all rows, each block's LoRA added to its contiguous rows
    peft: int = 0  # peft's per-row routing (adapter_names)
    base: int = 0  # no adapter of the call on this layer: the base layer alone


class RowGroupRouter:
    """Routes the row groups of a mixed batch through the peft LoRA layers among `layers`.

    stack_weights: the stacked route for Linear and 1x1 Conv2d layers (copies of their weights,
    fewest ops) or, False, the sliced route (no copies); None = stacked when the LoRA layers'
    weights are on the CPU.
    """

    def __init__(self, layers: Sequence[nn.Module], stack_weights: bool | None = None):
        from peft.tuners.lora import LoraLayer

        self.layers = [m for m in layers if isinstance(m, LoraLayer)]
        if stack_weights is None:
            stack_weights = all(m.base_layer.weight.device.type == "cpu" for m in self.layers
                                if isinstance(getattr(m.base_layer, "weight", None), torch.Tensor))
        self.stack_weights = stack_weights
        self._stacks: dict[nn.Module, tuple[tuple, torch.Tensor]] = {}

    @contextmanager
    def route(self, names: Sequence[str | None], n: int) -> Iterator[RouteCounts]:
        """Within the block, a call on G * n rows (G = len(names), block g = rows g*n:(g+1)*n)
        gives block g the output of the model with adapter names[g] alone (None: no adapter).
        Yields the counts of layers per route."""
        groups = len(names)
        rows = [RESERVED_ADAPTER if name is None else name for name in names for _ in range(n)]
        routable = not torch.is_grad_enabled()
        patched: dict[nn.Module, object] = {}  # layer -> its own instance forward (None: none)
        hooks = []
        counts = RouteCounts()
        for layer in self.layers:
            effective = _effective_names(layer, names)
            if all(name is None for name in effective):
                route = "base"
            else:
                route = _route_of(layer, effective, self.stack_weights) if routable else "peft"
            if route == "base":
                forward = _base_only(layer)
                counts.base += 1
            elif route == "stacked":
                forward = _stacked_forward(layer.base_layer, self._stack(layer, effective), groups)
                counts.stacked += 1
            elif route == "sliced":
                forward = _sliced_forward(layer, effective)
                counts.sliced += 1
            else:
                hooks.append(layer.register_forward_pre_hook(_names_injector(rows), with_kwargs=True))
                counts.peft += 1
                continue
            patched[layer] = layer.__dict__.get("forward")
            layer.forward = forward
        try:
            yield counts
        finally:
            for layer, own in patched.items():
                if own is None:
                    del layer.forward  # the class' forward shows through again
                else:
                    layer.forward = own
            for hook in hooks:
                hook.remove()

    def _stack(self, layer: nn.Module, names: tuple[str | None, ...]) -> torch.Tensor:
        """The layer's stacked weights for `names` (see _stacked_forward), cached under _stack_key."""
        key = _stack_key(layer, names)
        cached = self._stacks.get(layer)
        if cached is not None and cached[0] == key:
            return cached[1]
        with torch.no_grad():
            weight = layer.base_layer.weight
            merged = [weight if name is None else (weight.float() + layer.get_delta_weight(name).float()).to(weight.dtype)
                      for name in names]
            both = torch.stack(merged)
            stacked = (both.transpose(1, 2) if weight.ndim == 2 else both.flatten(2).unsqueeze(1)).contiguous()
        self._stacks[layer] = (key, stacked)
        return stacked


def _effective_names(layer: nn.Module, names: Sequence[str | None]) -> tuple[str | None, ...]:
    """names as this layer applies them: None where the layer lacks the adapter (peft skips it),
    all None while the layer's adapters are disabled (peft then runs the base layer alone)."""
    if layer.disable_adapters:
        return tuple(None for _ in names)
    held = set(layer.lora_A) | set(getattr(layer, "lora_embedding_A", {}))
    return tuple(name if name in held else None for name in names)


def _route_of(layer: nn.Module, names: tuple[str | None, ...], stack_weights: bool) -> str:
    """"stacked", "sliced" or "peft": how this layer runs its adapters in `names`. The two
    routes need a plain Linear or Conv2d base with its weights at hand and adapters that are
    s B A x alone; stacking also needs a Linear or 1x1 Conv2d (a batched matmul)."""
    base = layer.base_layer
    if type(base) not in (nn.Linear, nn.Conv2d) or layer.merged:
        return "peft"
    if hasattr(layer, "_hf_hook") or hasattr(base, "_hf_hook") or base.weight.device.type == "meta":
        return "peft"
    for name in filter(None, names):
        dropout = layer.lora_dropout[name]
        if (name in getattr(layer, "lora_variant", {}) or layer.use_dora.get(name, False)
                or getattr(layer, "lora_bias", {}).get(name, False) or name not in layer.lora_A
                or (dropout.training and not isinstance(dropout, nn.Identity))):
            return "peft"
    pointwise = type(base) is nn.Linear or (base.kernel_size == (1, 1) and base.stride == (1, 1)
                                            and base.padding == (0, 0) and base.groups == 1)
    return "stacked" if stack_weights and pointwise else "sliced"


def _stack_key(layer: nn.Module, names: tuple[str | None, ...]) -> tuple:
    """What the stacked weights depend on: names, scalings, and each tensor's storage and version."""
    tensors = [layer.base_layer.weight]
    for name in filter(None, names):
        tensors += [layer.lora_A[name].weight, layer.lora_B[name].weight]
    return (names, tuple(float(layer.scaling[name]) for name in filter(None, names)),
            tuple((t.data_ptr(), t._version, t.dtype, t.device) for t in tensors))


def _stacked_forward(base: nn.Module, weights: torch.Tensor, groups: int):
    """A forward computing G row blocks in one batched matmul. weights: Linear (G, in, out);
    1x1 Conv2d (G, 1, out, in)."""
    bias = base.bias
    if weights.ndim == 4:
        def conv_forward(x, *args, **kwargs):
            rows, channels, height, width = x.shape
            _check_rows(rows, groups)
            out = torch.matmul(weights, x.reshape(groups, rows // groups, channels, height * width))
            if bias is not None:
                out = out + bias.view(1, 1, -1, 1)
            return out.reshape(rows, -1, height, width)
        return conv_forward

    def linear_forward(x, *args, **kwargs):
        _check_rows(x.shape[0], groups)
        flat = x.reshape(groups, -1, x.shape[-1])
        out = torch.bmm(flat, weights) if bias is None else torch.baddbmm(bias, flat, weights)
        return out.reshape(*x.shape[:-1], weights.shape[-1])
    return linear_forward


def _sliced_forward(layer: nn.Module, names: tuple[str | None, ...]):
    """A forward running the base layer on all rows, then adding s_g B_g A_g x_g to row block g
    in place (block g = rows g*n:(g+1)*n, a view: no gather, no weight copy)."""
    base, groups = layer.base_layer, len(names)
    parts = [(g, layer.lora_A[name], layer.lora_B[name], layer.scaling[name])
             for g, name in enumerate(names) if name is not None]

    def forward(x, *args, **kwargs):
        _check_rows(x.shape[0], groups)
        out = base(x, *args, **kwargs)
        n = x.shape[0] // groups
        for g, lora_a, lora_b, scaling in parts:
            rows = x[g * n:(g + 1) * n]
            out[g * n:(g + 1) * n] += (lora_b(lora_a(rows.to(lora_a.weight.dtype))) * scaling).to(out.dtype)
        return out
    return forward


def _check_rows(rows: int, groups: int) -> None:
    if rows % groups:
        raise RuntimeError(f"a routed LoRA layer got {rows} rows, not a multiple of the {groups} row groups: "
                           "the mixed batch needs every layer's input batch-first; use mode='two_forward'")


def _base_only(layer: nn.Module):
    base = layer.base_layer

    def forward(x, *args, **kwargs):
        return base(x, *args, **kwargs)
    return forward


def _names_injector(rows: list[str]):
    """A forward pre-hook handing peft's LoRA layer `adapter_names=rows` (the diffusers UNet's
    forward does not take it; peft's own PeftModel route refuses in train mode)."""
    def inject(_module, args, kwargs):
        return args, {**kwargs, "adapter_names": rows}
    return inject
