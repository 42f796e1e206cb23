"""A stochastic flow-matching sampler with the flow ODE's marginals (Flow-GRPO's SDE).

Diffusers' flow convention (docs/method.md, flow matching): x_s = (1 - s) x_0 + s eps with
s = sigma in [0, 1]; the transformer predicts v = eps - x_0; the Euler ODE steps
x_{s'} = x_s + (s' - s) v. Given v at (x_s, s), eps_hat = x_s + (1 - s) v, so the score is
grad log p_s(x_s) = -eps_hat / s. Adding g(s) dW to the ODE and correcting the drift by
(g^2 / 2) * score keeps every marginal p_s (Fokker-Planck); discretized with step dt = s' - s < 0:

    x_{s'} = mu + std * z,   z ~ N(0, I)
    mu     = x_s + dt * [v + g^2 / (2 s) * (x_s + (1 - s) v)]  =  a * x_s + c * v
    a      = 1 + g^2 dt / (2 s)
    c      = dt * (1 + g^2 (1 - s) / (2 s))
    std    = g * sqrt(-dt),   g = noise_level * sqrt(s / (1 - s))

which is Flow-GRPO's `sde_step_with_logprob` (sde_type="sde"), including its guard at s = 1
(g uses 1 - sigmas[1] in place of 1 - s there). a, c and std depend on the schedule only, not on
the model: each step is N(a x_s + c v, std^2 I), so realignment (mixing v) is the exact
normalized geometric mixture of the two steps and the per-step KL between two velocities is
c^2 ||v_1 - v_2||^2 / (2 std^2) (deradiff.realign.path_kl reads a, c, std from
`step_coefficients`). noise_level = 0 is the Euler ODE, bit for bit.

Plug it into any stock flow-matching pipeline (SD3, FLUX) as its scheduler:

    pipe.scheduler = FlowMatchSDEScheduler.from_config(pipe.scheduler.config, noise_level=0.7)
    pipe.scheduler.generator = torch.Generator().manual_seed(0)   # pipelines do not pass theirs
    latents = pipe(prompt, output_type="latent").images
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteSchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from deradiff.errors import UserError

# Flow-GRPO's default noise scale a of the SDE step (see FlowMatchSDEScheduler).
DEFAULT_NOISE_LEVEL = 0.7


@dataclass(frozen=True)
class StepCoefficients:
    """One SDE step: x_{s'} ~ N(a * x_s + c * v, std^2 I); s and s_next are the sigmas."""

    a: float
    c: float
    std: float
    s: float
    s_next: float


@dataclass
class FlowMatchSDESchedulerOutput(FlowMatchEulerDiscreteSchedulerOutput):
    """prev_sample, plus the step's mean (float32, x's shape) and std (a float; 0 when noiseless)."""

    prev_sample_mean: torch.FloatTensor | None = None
    std: float | None = None


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: float | torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2 I) per sample, summed over all non-batch dims: (B, ...) -> (B,), nats.

    std: a positive float, or a tensor broadcastable to x (e.g. (B, 1, ..., 1)).
    """
    if not isinstance(std, torch.Tensor) and not std > 0:
        raise ValueError(f"std must be > 0, got {std} (a deterministic step has no Gaussian density)")
    s = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    lp = -(x - mean).pow(2) / (2 * s.pow(2)) - torch.log(s) - 0.5 * math.log(2 * math.pi)
    return lp.flatten(1).sum(1) if lp.ndim > 1 else lp


class FlowMatchSDEScheduler(FlowMatchEulerDiscreteScheduler):
    """FlowMatchEulerDiscreteScheduler whose step is Flow-GRPO's marginal-preserving SDE.

    Same sigmas, shifting and set_timesteps as the parent (pipelines use it unchanged); only
    `step` differs, as the module docstring derives. Extra config:
        noise_level: the SDE's noise scale a in g = a * sqrt(s / (1 - s)) (Flow-GRPO's default 0.7);
            0 delegates to the Euler ODE step.
    Attribute `generator` (a torch.Generator or None: torch's global RNG) draws the step noise
    when `step` gets no generator, which is how pipelines call it: seed it for reproducible noise.
    Not supported: per_token_timesteps, stochastic_sampling=True (the parent's own resampling).
    diffusers' DiffusionPipeline.from_pretrained loads schedulers from known libraries only: a
    pipeline saved with this scheduler installed does not reload; install it after loading.
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        invert_sigmas: bool = False,
        shift_terminal: float | None = None,
        use_karras_sigmas: bool = False,
        use_exponential_sigmas: bool = False,
        use_beta_sigmas: bool = False,
        time_shift_type: Literal["exponential", "linear"] = "exponential",
        stochastic_sampling: bool = False,
        noise_level: float = DEFAULT_NOISE_LEVEL,
    ):
        if not (math.isfinite(noise_level) and noise_level >= 0):
            raise UserError(f"noise_level must be a finite number >= 0, got {noise_level}")
        if stochastic_sampling:
            raise UserError("FlowMatchSDEScheduler is its own stochastic sampler: leave stochastic_sampling=False")
        super().__init__(
            num_train_timesteps=num_train_timesteps, shift=shift, use_dynamic_shifting=use_dynamic_shifting,
            base_shift=base_shift, max_shift=max_shift, base_image_seq_len=base_image_seq_len,
            max_image_seq_len=max_image_seq_len, invert_sigmas=invert_sigmas, shift_terminal=shift_terminal,
            use_karras_sigmas=use_karras_sigmas, use_exponential_sigmas=use_exponential_sigmas,
            use_beta_sigmas=use_beta_sigmas, time_shift_type=time_shift_type,
            stochastic_sampling=stochastic_sampling,
        )
        self.generator: torch.Generator | None = None

    # -- the step's distribution ---------------------------------------------------------------

    def step_index_of(self, timestep: float) -> int:
        """Index into `timesteps` of the entry nearest `timestep` (on the scheduler's axis)."""
        grid = self.timesteps.detach().to("cpu", torch.float64)
        return int(torch.argmin((grid - float(timestep)).abs()))

    def coefficients_at(self, index: int) -> StepCoefficients:
        """a, c, std of the step from sigmas[index] to sigmas[index + 1] (float64 arithmetic)."""
        s, s_next = float(self.sigmas[index]), float(self.sigmas[index + 1])
        dt = s_next - s
        if self.config.noise_level == 0 or dt >= 0:
            return StepCoefficients(1.0, dt, 0.0, s, s_next)
        # Flow-GRPO's guard: at s = 1 the factor s / (1 - s) is infinite; use 1 - sigmas[1] instead.
        one_minus_s = 1.0 - float(self.sigmas[1]) if s == 1.0 else 1.0 - s
        g2 = self.config.noise_level**2 * s / one_minus_s
        a = 1.0 + g2 * dt / (2.0 * s)
        c = dt * (1.0 + g2 * (1.0 - s) / (2.0 * s))
        return StepCoefficients(a, c, math.sqrt(g2 * -dt), s, s_next)

    def step_coefficients(self, timestep: float) -> StepCoefficients:
        """a, c, std of the step taken at `timestep` (one of `timesteps`, after set_timesteps)."""
        return self.coefficients_at(self.step_index_of(timestep))

    def step_distribution(
        self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of x_{s'} given v = model_output at (sample, timestep), in float32.

        timestep: a number, or a (B,) tensor of per-row timesteps (rows of a replay buffer may
        come from different steps). mean has sample's shape; std is (B, 1, ..., 1). Does not
        advance the scheduler.
        """
        rows = torch.as_tensor(timestep).flatten().tolist()
        if len(rows) == 1:
            rows = rows * sample.shape[0]
        coefs = [self.step_coefficients(t) for t in rows]
        shape = (-1,) + (1,) * (sample.ndim - 1)

        def column(name):
            return torch.tensor([getattr(k, name) for k in coefs], dtype=torch.float32, device=sample.device).view(shape)

        mean = column("a") * sample.float() + column("c") * model_output.float()
        return mean, column("std")

    def step_log_prob(
        self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
        prev_sample: torch.Tensor,
    ) -> torch.Tensor:
        """log p(prev_sample | sample) under this step with velocity model_output: (B,), nats."""
        mean, std = self.step_distribution(model_output, timestep, sample)
        return gaussian_log_prob(prev_sample.float(), mean, std)

    def step_kl(
        self, model_output: torch.Tensor, other_output: torch.Tensor, timestep: float | torch.Tensor,
        sample: torch.Tensor,
    ) -> torch.Tensor:
        """KL(step with model_output || step with other_output) at the same x_s: (B,), nats.

        Equal std: c^2 ||v_1 - v_2||^2 / (2 std^2), summed over non-batch dims.
        """
        mean, std = self.step_distribution(model_output, timestep, sample)
        other, _ = self.step_distribution(other_output, timestep, sample)
        return ((mean - other).pow(2) / (2 * std.pow(2))).flatten(1).sum(1)

    # -- sampling ------------------------------------------------------------------------------

    def step(
        self,
        model_output: torch.FloatTensor,
        timestep: float | torch.FloatTensor,
        sample: torch.FloatTensor,
        s_churn: float = 0.0,
        s_tmin: float = 0.0,
        s_tmax: float = float("inf"),
        s_noise: float = 1.0,
        generator: torch.Generator | None = None,
        per_token_timesteps: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> FlowMatchSDESchedulerOutput | tuple:
        """One SDE step from sample (x_s) to prev_sample (x_{s'}); same call as the parent's."""
        if self.config.noise_level == 0:
            return super().step(model_output, timestep, sample, s_churn, s_tmin, s_tmax, s_noise, generator,
                                per_token_timesteps, return_dict)
        if per_token_timesteps is not None:
            raise NotImplementedError("FlowMatchSDEScheduler does not support per_token_timesteps")
        if self.step_index is None:
            self._init_step_index(timestep)
        k = self.coefficients_at(self.step_index)
        # float32 as the parent (bf16 can overflow in the mean), cast back at the end.
        mean = k.a * sample.float() + k.c * model_output.float()
        noise = randn_tensor(sample.shape, generator=generator if generator is not None else self.generator,
                             device=sample.device, dtype=torch.float32)
        prev_sample = (mean + k.std * noise).to(model_output.dtype)
        self._step_index += 1
        if not return_dict:
            return (prev_sample,)
        return FlowMatchSDESchedulerOutput(prev_sample=prev_sample, prev_sample_mean=mean, std=k.std)
