"""Analytic training FLOPs per token and MFU, counting each mixer's attention honestly.

Matmuls: 6 x (non-embedding matrices + LM head) per token (forward 2, backward 4). Attention per
layer and token, forward: dense causal softmax ``2 * 2 * (T/2) * heads * head_dim``; InfLLM v2 above
``dense_len`` sees at most ``(init + topk + window/block) * block`` keys plus stage-1 scoring over
the compressed keys; Lightning (chunk C) ``heads * (4 * Dk * Dv + C * (Dk + Dv))``. Training = 3x forward.
"""

from __future__ import annotations

import math

import jax

from minicpm_jax.config.schema import ModelConfig
from minicpm_jax.model.factory import abstract_model, param_axes

LIGHTNING_CHUNK = 64
# dense bf16 peak FLOP/s per device, by jax device_kind prefix
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "NVIDIA B200": 2250e12,
}


def _attention_fwd_flops(cfg: ModelConfig, kind: str, seq_len: int) -> float:
    if kind == "lightning-attn":
        dk = dv = cfg.lightning_head_dim
        return cfg.lightning_nh * (4 * dk * dv + LIGHTNING_CHUNK * (dk + dv))
    heads, hd = cfg.num_attention_heads, cfg.attn_head_dim
    keys = seq_len / 2
    sparse = cfg.sparse_config
    if sparse is not None and seq_len >= sparse.dense_len:
        visible = (sparse.init_blocks + sparse.topk + sparse.window_size // sparse.block_size) * sparse.block_size
        keys = min(keys, visible) + (seq_len / 2) / sparse.kernel_stride  # + stage-1 scores over K1
    return 2 * 2 * keys * heads * hd


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token at sequence length ``seq_len``."""
    matmul = sum(
        math.prod(shape)
        for name, (shape, _) in param_axes(abstract_model(cfg)).items()
        if len(shape) >= 2 and not name.startswith("model.embed_tokens")
    )
    if cfg.tie_word_embeddings:
        matmul += cfg.vocab_size * cfg.hidden_size
    attention = sum(_attention_fwd_flops(cfg, kind, seq_len) for kind in cfg.layer_mixers)
    return 6 * matmul + 3 * attention


def peak_flops_per_device() -> float | None:
    """Dense bf16 peak of the local accelerator, or None (CPU, unknown devices)."""
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k)), None)
