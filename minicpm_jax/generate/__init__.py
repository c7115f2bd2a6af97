"""Generation: batched prefill + decode with caches, sampling, log-probabilities (``generate``)."""

from minicpm_jax.generate.engine import GenerationResult, generate
from minicpm_jax.generate.sampling import SamplingParams

__all__ = ["GenerationResult", "SamplingParams", "generate"]
