"""Lightning attention (SALA's linear-attention mixer): reference, recurrent, chunked XLA,
Pallas TPU and Pallas GPU kernels behind one API, plus the decode step and ALiBi slopes."""

from .api import lightning_attention, lightning_decode_step
from .decode import alibi_slopes
from .validation import IMPLEMENTATIONS

__all__ = ["lightning_attention", "lightning_decode_step", "alibi_slopes", "IMPLEMENTATIONS"]
