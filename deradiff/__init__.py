"""DeRaDiff: align a diffusion model once, realign it at sampling time.

The heart is :class:`deradiff.realign.RealignedUNet`, a drop-in denoiser that mixes the
reference (LoRA disabled) and aligned (LoRA enabled) outputs with one number, lambda.
"""

__version__ = "0.1.0"
