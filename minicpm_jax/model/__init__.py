"""Flax NNX models of the MiniCPM4 family and their construction (sharded or not)."""

from minicpm_jax.model.decoder import MiniCPMForCausalLM
from minicpm_jax.model.factory import abstract_model, create_model, param_axes, param_count

__all__ = ["MiniCPMForCausalLM", "abstract_model", "create_model", "param_axes", "param_count"]
