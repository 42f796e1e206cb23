"""Sampling-time realignment (DeRaDiff): mix reference and aligned denoiser outputs with lambda.

A diffusers pipeline takes :class:`RealignedDenoiser` in place of its ``unet`` (or
``transformer``). At every call it evaluates the reference (LoRA disabled, or a second model)
and the aligned model (LoRA enabled) on the same inputs and returns

    out = (1 - lam(t)) * out_ref + lam(t) * out_aligned

in the wrapped model's own output type. Every common parameterization (epsilon, v, x0,
flow velocity) makes the step mean affine in the output with a map shared by both branches, so
this is the normalized geometric mixture of the two Gaussian steps: the model that training at
KL strength beta / lam would have given (docs/method.md, the realignment section). No pipeline
code is copied; any scheduler that consumes the model output linearly works unchanged.

    pipe = StableDiffusionPipeline.from_pretrained(base)
    pipe.load_lora_weights(lora_dir)
    with realigned(pipe, lam=2.0) as denoiser:
        images = pipe(prompts, generator=torch.Generator().manual_seed(0)).images
    print(path_kl(denoiser.records, pipe.scheduler, guidance_scale=7.5))

Several rewards (docs/method.md section 2, "Several rewards"): LoRAs aligned once each to one
reward, loaded as named adapters, mixed with a lambda vector

    out = (1 - sum_i lam_i) * out_ref + sum_i lam_i * out_i      (out_i: adapter i alone)

    pipe.load_lora_weights(color_dir, adapter_name="color")
    pipe.load_lora_weights(contrast_dir, adapter_name="contrast")
    with realigned(pipe, lam={"color": 1.5, "contrast": 0.5}) as denoiser:   # or "color=1.5,contrast=0.5"
        images = pipe(prompts).images
"""

from __future__ import annotations

import inspect
import math
import numbers
import re
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from deradiff.errors import UserError
from deradiff.models import adapters_disabled, denoiser_name, lora_adapter_names, tuner_layers
from deradiff.routing import RESERVED_ADAPTER, RowGroupRouter

Mode = Literal["two_forward", "mixed_batch"]
MODES = ("two_forward", "mixed_batch")
SCHEDULE_KINDS = ("constant", "linear", "cosine", "step")


@dataclass(frozen=True)
class LambdaSchedule:
    """lam as a function of the diffusion timestep t in [0, num_train_timesteps].

    What lambda means: lam >= 0 multiplies the KL strength the model was trained against; the
    realigned model emulates training at beta = beta0 / lam (see emulated_beta): lam = 0 is the
    reference, lam = 1 the aligned model, lam > 1 extrapolates towards a weaker KL. The library
    accepts lam < 0 (the anti-aligned direction, for research); the CLI commands refuse it.

    Time axis: t is the timestep the pipeline hands the denoiser, on the scheduler's training
    axis [0, num_train_timesteps] (num_train_timesteps = pipe.scheduler.config.num_train_timesteps,
    read by `realigned`). Discrete schedulers (DDPM, DDIM, Euler, ...) pass t in that range;
    flow-matching schedulers (FlowMatchEulerDiscreteScheduler, as SD3 uses it) pass
    t = sigma * num_train_timesteps, so u below is 1 - sigma. Pipelines that hand their
    transformer t / 1000 (FLUX, Chroma, QwenImage) are brought back to this axis by the denoiser
    (RealignedDenoiser.schedule_timestep), so u = 1 - sigma there too.

    Progress u = 1 - t / num_train_timesteps runs from 0 (pure noise) to 1 (clean image).
    - constant: lam = start
    - linear:   lam = start + (end - start) * u
    - cosine:   lam = start + (end - start) * (1 - cos(pi * u)) / 2
    - step:     lam = start while t >= switch_t, end afterwards (switch_t in timestep units)
    Written on the command line as "2.0", "linear:0,2", "cosine:0,2" or "step:1,2@500".
    """

    kind: str = "constant"
    start: float = 1.0
    end: float = 1.0
    switch_t: float = 500.0

    def __post_init__(self):
        if self.kind not in SCHEDULE_KINDS:
            raise UserError(f"unknown lambda schedule {self.kind!r}; choose from {list(SCHEDULE_KINDS)}")
        if self.kind == "constant" and not math.isfinite(self.start):
            raise UserError(f"lambda must be a finite number, got {self.start}")
        for name in ("start", "end", "switch_t"):
            if not math.isfinite(getattr(self, name)):
                raise UserError(f"lambda schedule {name} must be a finite number, got {getattr(self, name)}")

    def __call__(self, t: float, num_train_timesteps: int = 1000) -> float:
        u = 1.0 - float(t) / num_train_timesteps
        if self.kind == "constant":
            return self.start
        if self.kind == "linear":
            return self.start + (self.end - self.start) * u
        if self.kind == "cosine":
            return self.start + (self.end - self.start) * (1.0 - math.cos(math.pi * u)) / 2.0
        return self.start if float(t) >= self.switch_t else self.end

    def __str__(self) -> str:
        if self.kind == "constant":
            return f"{self.start:g}"
        suffix = f"@{self.switch_t:g}" if self.kind == "step" else ""
        return f"{self.kind}:{self.start:g},{self.end:g}{suffix}"


def parse_lambda(spec: float | str | LambdaSchedule) -> LambdaSchedule:
    """A float, a string ("0.5", "linear:0,2", "cosine:0,2", "step:1,2@500") or a schedule.

    Any finite value is accepted, negative ones included (anti-aligned, for research); callers
    that need a KL strength use emulated_beta, which refuses lam <= 0. See LambdaSchedule.
    """
    if isinstance(spec, LambdaSchedule):
        return spec
    if isinstance(spec, (int, float)):
        return LambdaSchedule("constant", float(spec), float(spec))
    text = str(spec).strip()
    kind, _, rest = text.partition(":")
    try:
        if not rest:
            value = float(text)
            return LambdaSchedule("constant", value, value)
        values, _, switch = rest.partition("@")
        start, end = (float(v) for v in values.split(","))
        return LambdaSchedule(kind, start, end, float(switch) if switch else 500.0)
    except UserError:
        raise
    except ValueError:
        raise UserError(
            f"cannot read lambda {text!r}: write a number (2.0) or KIND:START,END with KIND in "
            f"{list(SCHEDULE_KINDS[1:])}, e.g. linear:0,2 or step:1,2@500"
        ) from None


def emulated_beta(beta0: float, lam: float) -> float:
    """The KL strength the realigned model emulates: beta0 / lam (beta0: the training beta).

    Raises UserError for lam <= 0 (no KL strength: lam = 0 is the reference itself, lam < 0 the
    anti-aligned direction) and for a non-finite lam or a beta0 that is not a positive number.
    """
    if not (math.isfinite(beta0) and beta0 > 0):
        raise UserError(f"beta0 must be a positive finite number, got {beta0}")
    if not math.isfinite(lam):
        raise UserError(f"lambda must be a finite number, got {lam}")
    if lam <= 0:
        raise UserError(
            f"lambda <= 0 has no KL strength (got {lam:g}): emulated beta = beta0 / lambda needs lambda > 0"
        )
    return beta0 / lam


# -- lambda vectors: several adapters, one lambda each ---------------------------------------------

_ADAPTER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")
# Pairs are split at a comma followed by NAME=; commas inside a schedule ("linear:0,2") are not.
_PAIR_SPLIT = re.compile(r",\s*(?=[A-Za-z_][A-Za-z0-9_.-]*\s*=)")
_VECTOR_FORMAT = ("write ADAPTER=LAMBDA pairs separated by commas, e.g. color=1.5,contrast=0.5 "
                  "(a LAMBDA may be a schedule: color=linear:0,2)")


@dataclass(frozen=True)
class LambdaVector:
    """One lambda (a LambdaSchedule) per LoRA adapter name: multi-objective realignment.

    The realigned output is (1 - sum_i lam_i(t)) * out_ref + sum_i lam_i(t) * out_i, where out_i
    is the model with adapter i alone (docs/method.md section 2, "Several rewards"). `items`
    holds (adapter name, schedule) pairs sorted by name, so equal vectors compare, hash and print
    equal whatever order they were written in. str() is the canonical form, e.g.
    "color=1.5,contrast=0.5" (numbers as `:g` writes them unless that loses digits), and
    parse_lambda_vector(str(v)) == v: usable as a results-table key. Values may be negative (the
    library accepts what parse_lambda accepts); commands that take vectors must refuse a negative
    lambda_i, as deradiff.evaluation.lams does for scalars.
    Adapter names: letters, digits, "_", "." and "-", not starting with a digit; "__base__" is
    reserved by peft.
    """

    items: tuple[tuple[str, LambdaSchedule], ...]

    def __post_init__(self):
        items = tuple(sorted(((str(n), parse_lambda(v)) for n, v in self.items), key=lambda item: item[0]))
        if not items:
            raise UserError(f"a lambda vector needs at least one adapter: {_VECTOR_FORMAT}")
        names = [n for n, _ in items]
        for name in names:
            if not _ADAPTER_NAME.fullmatch(name) or name == RESERVED_ADAPTER:
                raise UserError(f"adapter name {name!r} in a lambda vector: use letters, digits, '_', '.' and '-', "
                                f"not starting with a digit, and not {RESERVED_ADAPTER!r}")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise UserError(f"adapter {duplicates[0]!r} is given twice in a lambda vector: give each adapter one lambda")
        object.__setattr__(self, "items", items)

    @property
    def names(self) -> tuple[str, ...]:
        """The adapter names, sorted."""
        return tuple(n for n, _ in self.items)

    def __getitem__(self, name: str) -> LambdaSchedule:
        return dict(self.items)[name]

    def __call__(self, t: float, num_train_timesteps: int = 1000) -> dict[str, float]:
        """{adapter name: lam_i(t)} at a timestep on the training axis (see LambdaSchedule)."""
        return {n: schedule(t, num_train_timesteps) for n, schedule in self.items}

    def constants(self) -> dict[str, float] | None:
        """{adapter name: lam_i} when every lambda is a constant, else None."""
        if any(s.kind != "constant" for _, s in self.items):
            return None
        return {n: s.start for n, s in self.items}

    def __str__(self) -> str:
        return ",".join(f"{n}={_schedule_text(s)}" for n, s in self.items)


def _number_text(x: float) -> str:
    """`:g` (how lambda table keys are written) unless that loses digits; then repr."""
    text = f"{x:g}"
    return text if float(text) == x else repr(float(x))


def _schedule_text(schedule: LambdaSchedule) -> str:
    """LambdaSchedule.__str__ with every number written exactly."""
    if schedule.kind == "constant":
        return _number_text(schedule.start)
    suffix = f"@{_number_text(schedule.switch_t)}" if schedule.kind == "step" else ""
    return f"{schedule.kind}:{_number_text(schedule.start)},{_number_text(schedule.end)}{suffix}"


def parse_lambda_vector(spec: str | Mapping[str, float | str | LambdaSchedule] | LambdaVector) -> LambdaVector:
    """A LambdaVector from "color=1.5,contrast=linear:0,2", a dict {adapter: lambda} (values as
    parse_lambda takes them) or a LambdaVector. UserError (one line) for an empty vector, a pair
    without "=", a bad or repeated adapter name, or a lambda parse_lambda refuses (non-finite
    included). Negative values are accepted here; commands must refuse them (see LambdaVector)."""
    if isinstance(spec, LambdaVector):
        return spec
    if isinstance(spec, Mapping):
        return LambdaVector(tuple(_vector_item(name, value) for name, value in spec.items()))
    text = str(spec).strip()
    pairs = [p.strip() for p in _PAIR_SPLIT.split(text)] if text else []
    if not pairs or any("=" not in p for p in pairs):
        raise UserError(f"cannot read lambda vector {text!r}: {_VECTOR_FORMAT}")
    return LambdaVector(tuple(_vector_item(*(part.strip() for part in p.split("=", 1))) for p in pairs))


def _vector_item(name, value) -> tuple[str, LambdaSchedule]:
    try:
        return str(name), parse_lambda(value)
    except UserError as err:
        raise UserError(f"adapter {name!r} in a lambda vector: {err}") from None


def is_lambda_vector(spec) -> bool:
    """Whether `spec` means a lambda vector (a LambdaVector, a mapping, or text with "=")."""
    return isinstance(spec, (LambdaVector, Mapping)) or (isinstance(spec, str) and "=" in spec)


@dataclass
class StepRecord:
    """What one denoiser call saw: timestep (on the scheduler's axis, see
    RealignedDenoiser.schedule_timestep), lam and delta, with mixed - reference = lam * delta.

    Scalar lambda: lam = lam(t) and delta = aligned - reference output per row.
    Lambda vector: lam = 1.0 and delta = sum_i lam_i(t) * (out_i - out_ref), the combined
    shift, with the per-adapter values in `lams` ({adapter: lam_i(t)}; None for a scalar). Either
    way path_kl reads lam^2 * ||c_t * delta||^2 / (2 sigma_t^2) and needs nothing else.
    """

    timestep: float
    lam: float
    delta: torch.Tensor  # (B, ...) float32, on CPU: see the class docstring
    lams: dict[str, float] | None = None


@dataclass
class _Batch:
    """Positional and keyword arguments of one denoiser call, with the batch size found."""

    args: tuple
    kwargs: dict
    size: int
    timestep: float = field(default=0.0)


class RealignedDenoiser(nn.Module):
    """A denoiser returning (1 - lam(t)) * reference + lam(t) * aligned, or with a lambda vector
    (1 - sum_i lam_i(t)) * reference + sum_i lam_i(t) * out_i.

    Args:
        aligned: the adapted model (a diffusers UNet/transformer, with a peft LoRA in LoRA mode).
        lam: float, schedule string or LambdaSchedule; lam > 1 extrapolates. Or a lambda vector
            (a dict {adapter name: lambda}, "color=1.5,contrast=0.5" or a LambdaVector, see
            parse_lambda_vector): out_i is the model with adapter i alone (at its current peft
            scaling), whatever adapters are active; LoRA mode only. The user's active adapters and
            enabled flags are restored after every call. Adapters whose lambda is 0 at a step are
            not evaluated at that step.
        reference: a second full model (two-model mode); None means the aligned model with its
            adapters disabled (LoRA mode: one set of base weights in memory).
        mode: "two_forward" (one call for the reference, then one per adapter) or "mixed_batch"
            (one call on the batch repeated 1 + K times, the reference rows with no adapter and
            each following block with one adapter, K = 1 for a scalar lambda; LoRA mode. Routed
            by deradiff.routing: one batched matmul per plain LoRA layer against stacked merged
            weights, which cost 1 + K copies of those layers' weights while the denoiser lives,
            or, sliced, each block's LoRA added to its rows, no copies; see stack_weights.
            A scalar lambda needs exactly one active adapter: one adapter per row block).
        stack_weights: mixed_batch: the stacked route (fewest ops, weight copies) or, False, the
            sliced one (no copies); None = stacked on CPU, sliced on accelerators.
        record: keep a StepRecord per call for path_kl() (a lambda vector's record holds the
            combined delta, see StepRecord).
        num_train_timesteps: length of the scheduler's training axis, which schedules over t are
            read on (see LambdaSchedule). `realigned(pipe, ...)` passes
            pipe.scheduler.config.num_train_timesteps. None: the denoiser config's value when it
            declares one (analytic denoisers do; diffusers UNets do not), else 1000.
        scheduler: the pipeline's scheduler (`realigned` passes it). With a flow-matching
            scheduler, a call's timestep is mapped back to the scheduler's axis (FLUX-style
            pipelines hand their transformer t / 1000); see schedule_timestep.
        timestep_scale: an explicit factor from the call's timestep to the scheduler's axis
            (1000 for FLUX-style pipelines); overrides the detection.
    Call signatures: the noisy sample is the first argument, `sample=` or `hidden_states=`; the
    timestep is found by name in the wrapped model's forward signature (SD3/FLUX transformers
    take it fourth). In mixed_batch mode every tensor argument whose leading dim is the batch is
    repeated, except FLUX's position ids (`txt_ids`, `img_ids`: 2-D, shared by all rows).
    Unknown attributes (config, dtype, device, add_embedding, cache_context, ...) are read from
    `aligned`.
    """

    def __init__(
        self,
        aligned: nn.Module,
        lam: float | str | LambdaSchedule | Mapping | LambdaVector = 1.0,
        reference: nn.Module | None = None,
        mode: Mode = "two_forward",
        record: bool = True,
        num_train_timesteps: int | None = None,
        scheduler: Any = None,
        timestep_scale: float | None = None,
        stack_weights: bool | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise UserError(f"unknown realignment mode {mode!r}; choose from {list(MODES)}")
        if reference is None and not lora_adapter_names(aligned):
            raise UserError(
                "the aligned model has no LoRA adapter: load one (pipe.load_lora_weights(dir)) "
                "or pass a second full model as `reference`"
            )
        if mode == "mixed_batch" and reference is not None:
            raise UserError("mode='mixed_batch' needs LoRA mode (one model); use 'two_forward' with a reference")
        self.aligned = aligned
        self.reference = reference
        self.vector = parse_lambda_vector(lam) if is_lambda_vector(lam) else None
        self.schedule = None if self.vector is not None else parse_lambda(lam)
        self.mode = mode
        self.record = record
        self.records: list[StepRecord] = []
        self.num_train_timesteps = _resolve_num_train_timesteps(num_train_timesteps, aligned)
        if timestep_scale is not None and not (math.isfinite(timestep_scale) and timestep_scale > 0):
            raise UserError(f"timestep_scale must be a positive finite number, got {timestep_scale}")
        self.timestep_scale = timestep_scale
        self.scheduler = scheduler
        self._flow_grid = _FlowGrid() if _is_flow_matching(scheduler) else None
        self._arg_names = _positional_names(aligned)
        self._layers = tuner_layers(aligned) if reference is None else []
        self._router = RowGroupRouter(self._layers, stack_weights)
        if self.vector is not None:
            _check_vector_adapters(self.vector, aligned, self._layers, reference)
        elif mode == "mixed_batch":
            _single_active_adapter(self._layers)  # refuse several adapters now, before any work

    # -- attribute proxy: pipelines read config, dtype, device, add_embedding, ... -------------
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["aligned"], name)

    @property
    def dtype(self) -> torch.dtype:
        return self.aligned.dtype

    @property
    def device(self) -> torch.device:
        return self.aligned.device

    def lam_at(self, timestep: float) -> float | dict[str, float]:
        """lam at a timestep on the training axis [0, num_train_timesteps]; for a lambda vector,
        {adapter name: lam_i}."""
        if self.vector is not None:
            return self.vector(timestep, self.num_train_timesteps)
        return self.schedule(timestep, self.num_train_timesteps)

    def schedule_timestep(self, timestep: float) -> float:
        """A call's timestep on the scheduler's axis [0, num_train_timesteps].

        timestep * timestep_scale when one was given. Else, under a flow-matching scheduler
        whose timesteps are set: whichever of timestep and 1000 * timestep lies nearer one of
        scheduler.timesteps (SD3 hands the transformer t, FLUX-style pipelines t / 1000). Else
        unchanged (discrete schedulers: UNet pipelines hand t as it is).
        """
        if self.timestep_scale is not None:
            return timestep * self.timestep_scale
        if self._flow_grid is None:
            return timestep
        return self._flow_grid.to_axis(timestep, self.scheduler)

    def reset_records(self) -> None:
        self.records = []

    def forward(self, *args, **kwargs):
        batch = _read_batch(args, kwargs, self._arg_names)
        timestep = self.schedule_timestep(batch.timestep)
        if self.vector is not None:
            return self._vector_forward(batch, timestep)
        lam = self.lam_at(timestep)
        if lam == 0.0 and not self.record:
            return self._reference_forward(args, kwargs)
        if self.mode == "mixed_batch":
            ref_out, aligned_out = self._mixed_forward(batch)
        else:
            ref_out = self._reference_forward(args, kwargs)
            aligned_out = self.aligned(*args, **kwargs)
        ref, aligned = _first_tensor(ref_out), _first_tensor(aligned_out)
        if self.record:
            delta = (aligned.detach().float() - ref.detach().float()).cpu()
            self.records.append(StepRecord(timestep, lam, delta))
        # This exact form keeps lam=0 and lam=1 bit-identical to the branches;
        # ref + lam * (aligned - ref) is off by ~5e-7 at lam=1.
        mixed = (1.0 - lam) * ref + lam * aligned
        return _replace_first_tensor(aligned_out, mixed)

    def _reference_forward(self, args, kwargs):
        if self.reference is not None:
            return self.reference(*args, **kwargs)
        with adapters_disabled(self.aligned, self._layers):
            return self.aligned(*args, **kwargs)

    def _mixed_forward(self, batch: _Batch):
        """One call on [rows; rows] with the adapter off for the first half, on for the second."""
        n = batch.size
        args, kwargs = _repeat_call(batch.args, batch.kwargs, n, 2, self._arg_names)
        # Checked per call too: adapters can be switched on `aligned` after construction.
        adapter = _single_active_adapter(self._layers)
        with self._router.route([None, adapter], n):
            out = self.aligned(*args, **kwargs)
        both = _first_tensor(out)
        return _replace_first_tensor(out, both[:n]), _replace_first_tensor(out, both[n:])

    # -- lambda vectors ------------------------------------------------------------------------
    def _vector_forward(self, batch: _Batch, timestep: float):
        lams = self.vector(timestep, self.num_train_timesteps)
        used = [name for name, value in lams.items() if value != 0.0]  # a zero lambda adds nothing
        if self.mode == "mixed_batch" and used:
            ref_out, outs = self._mixed_vector_forward(batch, used)
        else:
            ref_out = self._reference_forward(batch.args, batch.kwargs)
            outs = {}
            for name in used:
                with _adapter_state(self._layers, active=[name]):
                    outs[name] = _first_tensor(self.aligned(*batch.args, **batch.kwargs))
        ref = _first_tensor(ref_out)
        if self.record:
            self.records.append(StepRecord(timestep, 1.0, mixed_delta(ref, outs, lams), dict(lams)))
        return _replace_first_tensor(ref_out, mix_outputs(ref, outs, lams))

    def _mixed_vector_forward(self, batch: _Batch, names: list[str]):
        """One call on the rows repeated 1 + K times: no adapter, then adapter names[k] alone."""
        n = batch.size
        args, kwargs = _repeat_call(batch.args, batch.kwargs, n, 1 + len(names), self._arg_names)
        with _adapter_state(self._layers), self._router.route([None, *names], n):
            out = self.aligned(*args, **kwargs)
        every = _first_tensor(out)
        outs = {name: every[(k + 1) * n:(k + 2) * n] for k, name in enumerate(names)}
        return _replace_first_tensor(out, every[:n]), outs


def mix_outputs(ref: torch.Tensor, outs: Mapping[str, torch.Tensor], lams: Mapping[str, float]) -> torch.Tensor:
    """(1 - sum_i lam_i) * ref + sum_i lam_i * outs[i]: the multi-objective mix, same shape as ref.

    lams: {adapter: lam_i} for every adapter of the vector; outs: {adapter: output with that
    adapter alone}, which may leave out adapters whose lam_i is 0. This form is exact at the
    corners (ref + sum_i lam_i (out_i - ref) is not): all lam_i = 0 gives ref, and lam_a = 1 with
    the rest 0 gives outs[a], bit for bit; one adapter reproduces the scalar mix's rounding.
    """
    mixed = (1.0 - math.fsum(lams.values())) * ref
    for name, out in outs.items():
        mixed = mixed + lams[name] * out
    return mixed


def mixed_delta(ref: torch.Tensor, outs: Mapping[str, torch.Tensor], lams: Mapping[str, float]) -> torch.Tensor:
    """sum_i lam_i * (outs[i] - ref), float32 on CPU, shape of ref: the mixed output's shift from
    the reference, what path_kl needs (zeros when outs is empty)."""
    ref32 = ref.detach().float()
    delta = torch.zeros_like(ref32)
    for name, out in outs.items():
        delta = delta + lams[name] * (out.detach().float() - ref32)
    return delta.cpu()


class _FlowGrid:
    """Maps a call's timestep to a flow-matching scheduler's axis (see schedule_timestep)."""

    # Pipelines that divide t by 1000 before calling their transformer: FLUX, Chroma, QwenImage, ...
    SCALES = (1.0, 1000.0)

    def __init__(self):
        self._source: torch.Tensor | None = None
        self._grid: torch.Tensor | None = None
        self._scale = 1.0  # the last scale found wins ties (a grid can hold both t and 1000 t)

    def to_axis(self, timestep: float, scheduler) -> float:
        grid = self._grid_of(scheduler)
        if grid is None:
            return timestep

        def distance(scale: float) -> float:
            return float((grid - timestep * scale).abs().min())

        scales = sorted(self.SCALES, key=lambda scale: scale != self._scale)
        self._scale = min(scales, key=distance)
        return timestep * self._scale

    def _grid_of(self, scheduler) -> torch.Tensor | None:
        timesteps = getattr(scheduler, "timesteps", None)
        if not isinstance(timesteps, torch.Tensor) or timesteps.numel() == 0:
            return None
        if timesteps is not self._source:  # set_timesteps makes a new tensor: copy it once
            self._source, self._grid = timesteps, timesteps.detach().to("cpu", torch.float64)
        return self._grid


def _is_flow_matching(scheduler) -> bool:
    """A FlowMatch* scheduler (timesteps = sigma * num_train_timesteps), subclasses included."""
    return any(cls.__name__.startswith("FlowMatch") for cls in type(scheduler).__mro__)


def _positional_names(model: nn.Module) -> tuple[str, ...] | None:
    """Names of the wrapped model's positional forward parameters, or None when unreadable."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = []
    for p in params:
        if p.kind not in kinds:
            break
        names.append(p.name)
    return tuple(names) or None


def _resolve_num_train_timesteps(value: int | None, aligned: nn.Module) -> int:
    if value is None:
        value = getattr(getattr(aligned, "config", None), "num_train_timesteps", None) or 1000
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise UserError(f"num_train_timesteps must be a positive integer, got {value!r}")
    return int(value)


def available_adapters(model: nn.Module, layers: list[nn.Module] | None = None) -> list[str]:
    """Every peft adapter loaded in `model`, active or not, sorted (diffusers' peft_config keys,
    and the adapters found on its peft layers)."""
    config = getattr(model, "peft_config", None)
    names = set(config) if isinstance(config, Mapping) else set()
    for layer in tuner_layers(model) if layers is None else layers:
        for attr in getattr(layer, "adapter_layer_names", ()):
            module = getattr(layer, attr, None)
            if isinstance(module, (nn.ModuleDict, nn.ParameterDict)):
                names.update(module.keys())
    return sorted(names)


def _check_vector_adapters(vector: LambdaVector, model: nn.Module, layers: list[nn.Module],
                           reference: nn.Module | None) -> None:
    """UserError (one line) unless a lambda vector can run on `model`: LoRA mode, every named
    adapter loaded, no adapter fused into the weights."""
    if reference is not None:
        raise UserError("a lambda vector mixes LoRA adapters of one model: pass reference=None and load each "
                        "LoRA as a named adapter (pipe.load_lora_weights(dir, adapter_name=NAME))")
    loaded = available_adapters(model, layers)
    missing = [name for name in vector.names if name not in loaded]
    if missing:
        raise UserError(f"unknown adapter {missing[0]!r} in the lambda vector {str(vector)!r}; the model's "
                        f"adapters: {loaded} (load one with pipe.load_lora_weights(dir, adapter_name={missing[0]!r}))")
    if any(getattr(layer, "merged", False) for layer in layers):
        raise UserError("a lambda vector runs each adapter alone, but adapters are fused into the weights: "
                        "unfuse them first (pipe.unfuse_lora())")


@contextmanager
def _adapter_state(layers: list[nn.Module], active: list[str] | None = None):
    """Adapters enabled on every peft layer for the block, with `active` as the active adapters
    when given; each layer's own active adapters and enabled flag are put back afterwards (the
    same objects). Sets peft's fields directly: set_adapter would change requires_grad flags."""
    saved = [(layer._active_adapter, layer._disable_adapters) for layer in layers]
    for layer in layers:
        layer._disable_adapters = False
        if active is not None:
            layer._active_adapter = list(active)
    try:
        yield
    finally:
        for layer, (was_active, was_disabled) in zip(layers, saved, strict=True):
            layer._active_adapter, layer._disable_adapters = was_active, was_disabled


def _single_active_adapter(layers: list[nn.Module]) -> str:
    """The one active adapter of these peft layers; UserError when several are active."""
    names: list[str] = []
    for layer in layers:
        names += [n for n in layer.active_adapters if n not in names]
    if len(names) > 1:
        raise UserError(
            f"mode='mixed_batch' applies one adapter per batch row but {len(names)} adapters are active "
            f"({', '.join(names)}): use mode='two_forward', or fuse them (pipe.fuse_lora) or activate one "
            "(pipe.set_adapters)"
        )
    return names[0]


@contextmanager
def realigned(pipe, lam: float | str | LambdaSchedule | Mapping | LambdaVector = 1.0,
              reference: nn.Module | None = None,
              mode: Mode = "two_forward", record: bool = True, num_train_timesteps: int | None = None,
              timestep_scale: float | None = None, stack_weights: bool | None = None):
    """Install a RealignedDenoiser as the pipeline's unet/transformer for the `with` block.

    lam: a scalar lambda or schedule, or a lambda vector over the pipeline's LoRA adapters
    ({"color": 1.5, "contrast": 0.5}, "color=1.5,contrast=0.5"; see RealignedDenoiser).
    Restores the original module afterwards, so `pipe.set_adapters`, `pipe.save_pretrained` and
    friends keep working outside the block. Yields the denoiser (for its `records`).
    num_train_timesteps (the time axis of lambda schedules) defaults to the pipeline scheduler's
    config.num_train_timesteps; the denoiser gets the scheduler (pipe.scheduler when the block
    starts: set the scheduler before it) to map the calls' timesteps onto that axis.
    """
    attr = denoiser_name(pipe)
    original = getattr(pipe, attr)
    scheduler = getattr(pipe, "scheduler", None)
    if num_train_timesteps is None:
        num_train_timesteps = getattr(getattr(scheduler, "config", None), "num_train_timesteps", None)
    denoiser = RealignedDenoiser(original, lam=lam, reference=reference, mode=mode, record=record,
                                 num_train_timesteps=num_train_timesteps, scheduler=scheduler,
                                 timestep_scale=timestep_scale, stack_weights=stack_weights)
    # Bypass DiffusionPipeline.__setattr__, which would rewrite the pipeline's saved config.
    object.__setattr__(pipe, attr, denoiser)
    try:
        yield denoiser
    finally:
        object.__setattr__(pipe, attr, original)


# -- path KL -------------------------------------------------------------------------------------


def path_kl(
    records: list[StepRecord], scheduler, guidance_scale: float = 1.0, eta: float = 0.0
) -> torch.Tensor | None:
    """Emulated per-sample KL(realigned path || reference path), in nats, shape (B,).

    KL_path = sum_t lam_t^2 * ||mu_aligned - mu_ref||^2 / (2 sigma_t^2): both branches share the
    step variance, and mu is affine in the (guided) model output with the shared map
    mu = a_t * x_t + c_t * out, so mu_aligned - mu_ref = c_t * (guided delta). Lambda vectors:
    the records hold lam = 1 and delta = sum_i lam_i (out_i - out_ref), so the same sum is
    ||mu_mix - mu_ref||^2 / (2 sigma_t^2) of the mixed step, exactly (StepRecord).

    guidance_scale: the classifier-free guidance scale that combined the cond and uncond
    branches into the step's prediction, 1 when there was none; the KL is of the guided
    prediction, one term per step. Its branches come in one of two layouts: one call per step
    on [uncond; cond] rows (SD1.5, SDXL, SD3), or two calls per step, cond then uncond, found as
    consecutive records at the same timestep (FluxPipeline's true CFG: true_cfg_scale > 1 with a
    negative prompt; pass that true_cfg_scale). records_guidance_scale(pipe, ...) gives the value
    for a pipeline call; guidance-distilled FLUX.1-dev without true CFG makes one call per step
    on one row per sample, scale 1.
    `eta` is the DDIM eta the pipeline was called with. Noiseless steps are left out; returns
    None for deterministic samplers (every sigma_t = 0: the path KL is not finite), for
    schedulers without a closed form here, and for steps of more than two calls (e.g. SD3's
    skip-layer guidance), whose combination is not known here.
    """
    if not records:
        return None
    total = None
    for step in _steps(records):
        if len(step) > 2:
            return None
        if len(step) == 2 and guidance_scale == 1.0:
            raise ValueError("the records hold two denoiser calls per step (cond, uncond: true CFG); pass the "
                             "pipeline's true_cfg_scale as guidance_scale (records_guidance_scale says which)")
        lam, delta = _guided_shift(step, guidance_scale)
        coef, sigma = step_mean_coefficient(scheduler, step[0].timestep, eta)
        if sigma is None:
            return None
        if sigma <= 0:  # noiseless final step (DDPM t=0): no density, left out as DDPO does
            continue
        kl = lam**2 * (coef**2) * delta.flatten(1).pow(2).sum(1) / (2.0 * sigma**2)
        total = kl if total is None else total + kl
    return total  # None when every step was noiseless (a deterministic sampler)


def _steps(records: list[StepRecord]) -> list[list[StepRecord]]:
    """Records grouped into sampling steps: consecutive records at the same timestep (a step's
    separate cond and uncond calls) form one step."""
    steps: list[list[StepRecord]] = []
    for rec in records:
        if steps and steps[-1][0].timestep == rec.timestep:
            steps[-1].append(rec)
        else:
            steps.append([rec])
    return steps


def _guided_shift(step: list[StepRecord], guidance_scale: float) -> tuple[float, torch.Tensor]:
    """(lam, delta) of one step's guided prediction, mixed - reference = lam * delta (B, ...):
    from [uncond; cond] rows of one record, or from separate cond and uncond records."""
    if len(step) == 2:
        cond, uncond = step
        if cond.lam != uncond.lam:  # a lambda vector records lam = 1 and folds lam_i into delta
            raise ValueError(f"the cond and uncond calls of a step have different lambdas ({cond.lam}, {uncond.lam})")
        return cond.lam, uncond.delta + guidance_scale * (cond.delta - uncond.delta)
    (rec,) = step
    if guidance_scale > 1.0:
        uncond, cond = rec.delta.chunk(2)
        return rec.lam, uncond + guidance_scale * (cond - uncond)
    return rec.lam, rec.delta


def records_guidance_scale(pipe, guidance_scale: float, true_cfg_scale: float = 1.0) -> float:
    """The guidance_scale to hand path_kl for records of a call of `pipe` with these scales: the
    CFG scale when the pipeline batches [uncond; cond] rows (SD1.5, SDXL, SD3: they have
    do_classifier_free_guidance and do so when it is > 1); else (FLUX: guidance_scale is a model
    input) true_cfg_scale, which the caller passes when the call ran true CFG (FluxPipeline
    does when true_cfg_scale > 1 and a negative prompt is given: two calls per step)."""
    return guidance_scale if hasattr(type(pipe), "do_classifier_free_guidance") else true_cfg_scale


def step_mean_coefficient(scheduler, timestep: float, eta: float = 0.0) -> tuple[float, float | None]:
    """(c_t, sigma_t) with mu_{t-1} = a_t x_t + c_t * model_output and step noise std sigma_t.

    Exact for DDPMScheduler (fixed_small variance) and DDIMScheduler (sigma from eta; eta = 0
    is deterministic) with epsilon or v prediction, when clip_sample/thresholding are off
    (clipping x0 makes the step nonlinear), and for schedulers that state their step as
    `step_coefficients(timestep)` -> (.c, .std) (deradiff.flow.FlowMatchSDEScheduler: c times the
    velocity, std 0 at noise_level 0). Other schedulers: (nan, None).
    """
    if callable(getattr(scheduler, "step_coefficients", None)):
        coefficients = scheduler.step_coefficients(timestep)
        return coefficients.c, coefficients.std
    name = type(scheduler).__name__
    if name not in ("DDPMScheduler", "DDIMScheduler"):
        return float("nan"), None
    cfg = scheduler.config
    t = int(round(float(timestep)))
    abar = scheduler.alphas_cumprod
    if name == "DDPMScheduler":
        prev_t = scheduler.previous_timestep(t) if hasattr(scheduler, "previous_timestep") else t - 1
        abar_t = float(abar[t])
        abar_prev = float(abar[prev_t]) if prev_t >= 0 else 1.0
        beta_t = 1.0 - abar_t / abar_prev
        coef_eps = -beta_t / (math.sqrt(1.0 - beta_t) * math.sqrt(1.0 - abar_t))
        var = (1.0 - abar_prev) / (1.0 - abar_t) * beta_t
        if cfg.variance_type not in ("fixed_small", None):
            return float("nan"), None
        # diffusers clamps the variance at 1e-20: such a step is noiseless (e.g. the last one).
        sigma = math.sqrt(var) if t > 0 and var > 1e-12 else 0.0
    elif name == "DDIMScheduler":
        step = cfg.num_train_timesteps // scheduler.num_inference_steps
        prev_t = t - step
        abar_t = float(abar[t])
        abar_prev = float(abar[prev_t]) if prev_t >= 0 else float(scheduler.final_alpha_cumprod)
        var = (1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev)
        sigma = eta * math.sqrt(var)
        coef_eps = -math.sqrt(abar_prev) * math.sqrt(1.0 - abar_t) / math.sqrt(abar_t) + math.sqrt(
            max(1.0 - abar_prev - sigma**2, 0.0)
        )
    if cfg.prediction_type == "v_prediction":  # eps = sqrt(abar) v + sqrt(1 - abar) x
        coef_eps *= math.sqrt(abar_t)
    elif cfg.prediction_type != "epsilon":
        return float("nan"), None
    return coef_eps, sigma


# -- batch plumbing ------------------------------------------------------------------------------


# Arguments without a batch dim whose leading size may still equal the batch size by chance:
# FLUX's text and image position ids, (L, 3), shared by all rows.
_UNBATCHED_ARGUMENTS = frozenset({"txt_ids", "img_ids"})


def _read_batch(args: tuple, kwargs: dict, names: tuple[str, ...] | None = None) -> _Batch:
    """The sample and timestep of a call; names: the forward's positional parameter names
    (None: the UNet convention, sample then timestep)."""
    given = {**dict(zip(names or ("sample", "timestep"), args, strict=False)), **kwargs}
    sample = args[0] if args else given.get("sample", given.get("hidden_states"))
    if not isinstance(sample, torch.Tensor):
        raise TypeError("RealignedDenoiser expects the noisy sample as first argument, `sample=` or `hidden_states=`")
    timestep = given.get("timestep")
    if isinstance(timestep, torch.Tensor):
        timestep = timestep.flatten()[0].item() if timestep.numel() else 0.0
    return _Batch(args, kwargs, sample.shape[0], float(timestep if timestep is not None else 0.0))


def _repeat_call(args: tuple, kwargs: dict, n: int, copies: int,
                 names: tuple[str, ...] | None) -> tuple[tuple, dict]:
    """The call's arguments with every batched tensor repeated `copies` times ([rows; rows; ...])."""
    names = names or ()
    args = tuple(
        v if i < len(names) and names[i] in _UNBATCHED_ARGUMENTS else _repeat_batch(v, n, copies)
        for i, v in enumerate(args)
    )
    kwargs = {k: v if k in _UNBATCHED_ARGUMENTS else _repeat_batch(v, n, copies) for k, v in kwargs.items()}
    return args, kwargs


def _repeat_batch(obj, n: int, copies: int):
    """Concatenate `copies` times every tensor whose leading dim is the batch size (recursively)."""
    if isinstance(obj, torch.Tensor):
        return torch.cat([obj] * copies) if obj.ndim > 0 and obj.shape[0] == n else obj
    if isinstance(obj, dict):
        return {k: _repeat_batch(v, n, copies) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_repeat_batch(v, n, copies) for v in obj)
    return obj


def _first_tensor(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out.sample if hasattr(out, "sample") else out


def _replace_first_tensor(out, tensor: torch.Tensor):
    if isinstance(out, torch.Tensor):
        return tensor
    if isinstance(out, tuple):
        return (tensor, *out[1:])
    # diffusers BaseOutput dataclasses (UNet2DConditionOutput, Transformer2DModelOutput, ...)
    return type(out)(**{**out, next(iter(out.keys())): tensor})
