"""Hugging Face import/export: the official MiniCPM layout and a plain Llama layout (scalars folded)."""

from minicpm_jax.interop.formats import FORMATS
from minicpm_jax.interop.load import CheckpointError, load_hf_checkpoint
from minicpm_jax.interop.save import save_hf_checkpoint

__all__ = ["FORMATS", "CheckpointError", "load_hf_checkpoint", "save_hf_checkpoint"]
