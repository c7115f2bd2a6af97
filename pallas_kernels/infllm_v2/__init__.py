"""InfLLM v2: dense-sparse switchable block-sparse attention (MiniCPM4 / MiniCPM-SALA).

Parts: ``compress_keys`` (mean-pooled K1/K2), ``block_scores`` / ``select_blocks`` (stage-1 scores
fused with the max-pool, top-k), ``block_sparse_attention`` (reference / xla / pallas_tpu /
pallas_gpu), ``infllm_v2_attention`` (dispatch, dense below ``dense_len``) and a decode cache.
"""

from .api import IMPLEMENTATIONS, block_sparse_attention, infllm_v2_attention, resolve_implementation
from .compress import compress_keys, mean_pool
from .config import InfLLMv2Config
from .decode import DecodeCache, decode_step, init_cache, prefill_cache
from .dense import dense_causal_attention
from .selection import attention_blocks, block_scores, select_blocks

__all__ = [
    "IMPLEMENTATIONS",
    "InfLLMv2Config",
    "DecodeCache",
    "attention_blocks",
    "block_scores",
    "block_sparse_attention",
    "compress_keys",
    "decode_step",
    "dense_causal_attention",
    "infllm_v2_attention",
    "init_cache",
    "mean_pool",
    "prefill_cache",
    "resolve_implementation",
    "select_blocks",
]
