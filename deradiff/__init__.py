"""DeRaDiff: align a diffusion model once, realign it at sampling time.

The heart is :class:`deradiff.realign.RealignedDenoiser`, a drop-in denoiser that mixes the
reference (LoRA disabled) and aligned (LoRA enabled) outputs with one number, lambda.

Layout (import-linter contracts in pyproject.toml keep it so):
- core: realign, models, errors, seeding, io, stats, grids, registry, analytic
- deradiff.training: recipe schema, trainer, methods (DPO, KL), data, checkpoints
- deradiff.evaluation: sampling, evaluate, search, validate, report
- plug-ins (register themselves): deradiff.rewards, deradiff.toy
"""

__version__ = "0.1.0"
