"""minicpm_jax: MiniCPM4 and MiniCPM-SALA in JAX / Flax NNX."""

__version__ = "0.1.0"
