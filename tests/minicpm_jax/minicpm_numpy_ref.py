"""Independent NumPy reference of the dense MiniCPM4 forward, transcribed from spec/minicpm4.md 2.5.

It reads a Hugging Face state dict (numpy) and ``config.json`` dict; the spec verified it against
the official remote code to 3.6e-7 (fp32). Also a loader for an exported checkpoint directory.
"""

import json
import math
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


def rms_norm(x, w, eps):
    var = np.mean(x.astype(np.float32) ** 2, axis=-1, keepdims=True)
    return (x / np.sqrt(var + eps)) * w


def longrope_cos_sin(cfg, seq_len_cached, head_dim):
    base = cfg.get("rope_theta", 10000.0)
    inv_freq = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    rs = cfg["rope_scaling"]
    orig = rs["original_max_position_embeddings"]
    mscale = math.sqrt(1 + math.log(cfg["max_position_embeddings"] / orig) / math.log(orig))
    ext = np.asarray(rs["long_factor"] if seq_len_cached > orig else rs["short_factor"], np.float32)
    t = np.arange(seq_len_cached, dtype=np.float32)
    freqs = np.outer(t, 1.0 / ext).astype(np.float32) * inv_freq[None, :]
    emb = np.concatenate([freqs, freqs], -1)
    return np.cos(emb) * mscale, np.sin(emb) * mscale


def rotate_half(x):
    h = x.shape[-1] // 2
    return np.concatenate([-x[..., h:], x[..., :h]], -1)


def forward(P, cfg, ids):  # P: HF state dict as numpy; ids: [T]
    H, L = cfg["hidden_size"], cfg["num_hidden_layers"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd, eps, T = H // nh, cfg["rms_norm_eps"], ids.shape[0]
    cos, sin = longrope_cos_sin(cfg, max(cfg["max_position_embeddings"], T), hd)
    cos, sin = cos[:T], sin[:T]
    x = P["model.embed_tokens.weight"][ids] * cfg["scale_emb"]
    rs = cfg["scale_depth"] / math.sqrt(L)
    mask = np.triu(np.full((T, T), -np.inf, np.float32), 1)
    for i in range(L):

        def p(n):
            return P[f"model.layers.{i}.{n}"]

        h = rms_norm(x, p("input_layernorm.weight"), eps)
        q = (h @ p("self_attn.q_proj.weight").T).reshape(T, nh, hd)
        k = (h @ p("self_attn.k_proj.weight").T).reshape(T, nkv, hd)
        v = (h @ p("self_attn.v_proj.weight").T).reshape(T, nkv, hd)
        q = q * cos[:, None] + rotate_half(q) * sin[:, None]
        k = k * cos[:, None] + rotate_half(k) * sin[:, None]
        k, v = np.repeat(k, nh // nkv, 1), np.repeat(v, nh // nkv, 1)
        s = np.einsum("thd,shd->hts", q, k) / math.sqrt(hd) + mask
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        x = x + (np.einsum("hts,shd->thd", s, v).reshape(T, H) @ p("self_attn.o_proj.weight").T) * rs
        h = rms_norm(x, p("post_attention_layernorm.weight"), eps)
        g = h @ p("mlp.gate_proj.weight").T
        x = x + (((g / (1 + np.exp(-g))) * (h @ p("mlp.up_proj.weight").T)) @ p("mlp.down_proj.weight").T) * rs
    x = rms_norm(x, P["model.norm.weight"], eps)
    return (x / (H / cfg["dim_model_base"])) @ P.get("lm_head.weight", P["model.embed_tokens.weight"]).T


def read_checkpoint(directory):
    """``(state dict, config dict)`` of an exported checkpoint directory, all fp32 numpy."""
    directory = Path(directory)
    P = {}
    for f in sorted(directory.glob("*.safetensors")):
        P.update({k: v.astype(np.float32) for k, v in load_file(f).items()})
    return P, json.loads((directory / "config.json").read_text())
