"""Independent float64 NumPy reference of MiniCPM-SALA (and sparse MiniCPM4), written from the specs.

- ``lightning_layer``: spec/sala.md 1.5 (q/k/v, per-head RMSNorm before RoPE, recurrence
  ``S_t = exp(-slope) S_{t-1} + k_t^T v_t``, ``o_t = scale q_t S_t``, o_norm over the full width,
  ``sigmoid(z_proj(x))`` gate, o_proj) with the ALiBi slopes of 1.6 computed here from the formula.
- ``softmax_layer``: spec/sala.md 1.4 / spec/infllm_v2.md 4-5 (GQA, optional RoPE, dense causal below
  ``dense_len``, InfLLM v2 generation B with the LSE approximation at or above it, selection on
  pre-RoPE q/k with ``use_nope``, sigmoid ``o_gate``). The InfLLM v2 part is a transcription of the
  spec's NumPy reference (section 5), with the per-head loop vectorised.
- ``forward``: the whole model (spec/sala.md 1.3) from a Hugging Face state dict + config.json dict.
"""

import math

import numpy as np
from minicpm_numpy_ref import longrope_cos_sin, rotate_half


def rms_norm(x, w, eps):
    return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + eps) * w


def slopes(h):
    """ALiBi slopes ``start * start**i``, ``start = 2**(-2**-(log2(h) - 3))`` (power-of-two h only)."""
    assert math.log2(h).is_integer()
    start = 2.0 ** (-(2.0 ** -(math.log2(h) - 3)))
    return np.array([start * start**i for i in range(h)])


def cos_sin(cfg, t, head_dim):
    if cfg.get("rope_scaling"):
        cos, sin = longrope_cos_sin(cfg, max(cfg["max_position_embeddings"], t), head_dim)
        return cos[:t].astype(np.float64), sin[:t].astype(np.float64)
    inv = 1.0 / (cfg.get("rope_theta", 10000.0) ** (np.arange(0, head_dim, 2) / head_dim))
    emb = np.concatenate([np.outer(np.arange(t), inv)] * 2, -1)
    return np.cos(emb), np.sin(emb)


def rope(x, cos, sin):  # x [T, H, D]
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def lightning_layer(p, cfg, x):
    """One ``"lightning-attn"`` mixer on x ``[T, hidden]`` (the output of input_layernorm)."""
    t, nh, hd, eps = x.shape[0], cfg["lightning_nh"], cfg["lightning_head_dim"], cfg["rms_norm_eps"]
    nkv = cfg["lightning_nkv"]
    q = (x @ p("q_proj.weight").T).reshape(t, nh, hd)
    k = (x @ p("k_proj.weight").T).reshape(t, nkv, hd)
    v = (x @ p("v_proj.weight").T).reshape(t, nkv, hd)
    if cfg.get("qk_norm"):
        q, k = rms_norm(q, p("q_norm.weight"), eps), rms_norm(k, p("k_norm.weight"), eps)
    if cfg.get("lightning_use_rope", True):
        cos, sin = cos_sin(cfg, t, hd)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
    k, v = np.repeat(k, nh // nkv, 1), np.repeat(v, nh // nkv, 1)
    lam = np.exp(-slopes(nh))[:, None, None]
    state = np.zeros((nh, hd, hd))
    o = np.zeros((t, nh, hd))
    for i in range(t):
        state = lam * state + k[i][:, :, None] * v[i][:, None, :]
        o[i] = np.einsum("hd,hde->he", q[i] * hd**-0.5, state)
    o = o.reshape(t, nh * hd)
    if cfg.get("use_output_norm"):
        o = rms_norm(o, p("o_norm.weight"), eps)
    if cfg.get("use_output_gate"):
        o = o / (1 + np.exp(-(x @ p("z_proj.weight").T)))
    return o @ p("o_proj.weight").T


# ----- InfLLM v2, generation B (spec/infllm_v2.md 5) -----


def compress(k, ks, kst):  # [T, H, D] -> mean over full windows [j*kst, j*kst+ks)
    n = (k.shape[0] - ks) // kst + 1 if k.shape[0] >= ks else 0
    return np.stack([k[j * kst : j * kst + ks].mean(0) for j in range(n)]) if n else np.zeros((0,) + k.shape[1:])


def stage1_scores(q, k1, k2, ks, kst):
    """S [Hkv, T, n1]: exp(q.K1/sqrt(D) - lse over the visible K2), summed over each group's heads."""
    t, hq, d = q.shape
    hkv = k1.shape[1]
    g = hq // hkv
    s = np.zeros((hkv, t, k1.shape[0]))
    kv_head = np.arange(hq) // g
    for i in range(t):
        v1 = np.arange(k1.shape[0]) * kst + ks - 1 <= i
        v2 = np.arange(k2.shape[0]) * 4 * kst + 4 * ks - 1 <= i
        s1 = np.einsum("jhd,hd->hj", k1[:, kv_head], q[i]) / math.sqrt(d)  # [Hq, n1]
        if not v2.any():
            continue  # lse = -inf: every candidate block is forced anyway
        s2 = (np.einsum("jhd,hd->hj", k2[:, kv_head], q[i]) / math.sqrt(d))[:, v2]
        lse = np.log(np.exp(s2 - s2.max(-1, keepdims=True)).sum(-1)) + s2.max(-1)
        p = np.where(v1, np.exp(s1 - lse[:, None]), 0.0)
        for h in range(hq):
            s[h // g, i] += p[h]
    return s


def select(s, t, block, kst, init, local, n_sel):
    """Selected block ids [Hkv, T, n] (sorted, -1 = none): max-pool, forced blocks, top-k (lower id on ties)."""
    hkv, _, n1 = s.shape
    nb, st = -(-t // block), block // kst
    kk = min(n_sel, nb)
    sel = np.full((hkv, t, kk), -1)
    for i in range(t):
        qb = i // block
        for g in range(hkv):
            score = np.empty(nb)
            for b in range(nb):
                lo, hi = max(b * st - 1, 0), min(b * st + st, n1)
                score[b] = s[g, i, lo:hi].max() if hi > lo else -np.inf
                if b < init or qb - local <= b <= qb:
                    score[b] = np.inf
            idx = np.sort(np.argsort(-score, kind="stable")[:kk])
            sel[g, i] = np.where(idx > qb, -1, idx)
    return sel


def attend(q, k, v, sel, block):
    """Causal softmax of each (token, head) over the tokens of its group's selected blocks."""
    t, hq, d = q.shape
    g = hq // k.shape[1]
    out = np.zeros(q.shape)
    for i in range(t):
        for h in range(hq):
            keys = [j for b in sel[h // g, i] if b >= 0 for j in range(b * block, min((b + 1) * block, i + 1))]
            s = k[keys, h // g] @ q[i, h] / math.sqrt(d)
            p = np.exp(s - s.max())
            out[i, h] = (p / p.sum()) @ v[keys, h // g]
    return out


def infllm_v2(q, k, v, sc, q_sel=None, k_sel=None):
    """InfLLM v2 attention of one sequence (dense causal when T < dense_len)."""
    t, block = q.shape[0], sc["block_size"]
    local = sc["window_size"] // block
    if 0 < sc["dense_len"] and t < sc["dense_len"]:
        sel = np.broadcast_to(np.arange(-(-t // block)), (k.shape[1], t, -(-t // block)))
        return attend(q, k, v, sel, block)
    qs, ks_ = (q if q_sel is None else q_sel), (k if k_sel is None else k_sel)
    ks, kst = sc["kernel_size"], sc["kernel_stride"]
    s = stage1_scores(qs, compress(ks_, ks, kst), compress(ks_, 4 * ks, 4 * kst), ks, kst)
    sel = select(s, t, block, kst, sc["init_blocks"], local, sc["topk"] + local)
    return attend(q, k, v, sel, block)


def softmax_layer(p, cfg, x):
    """One ``"minicpm4"`` mixer: dense/InfLLM v2 GQA attention, optional RoPE, optional o_gate."""
    t, nh, nkv = x.shape[0], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or cfg["hidden_size"] // nh
    q = (x @ p("q_proj.weight").T).reshape(t, nh, hd)
    k = (x @ p("k_proj.weight").T).reshape(t, nkv, hd)
    v = (x @ p("v_proj.weight").T).reshape(t, nkv, hd)
    sc = cfg.get("sparse_config")
    q_sel = k_sel = None
    if cfg.get("attn_use_rope", True):
        if sc and sc["use_nope"]:
            q_sel, k_sel = q, k
        cos, sin = cos_sin(cfg, t, hd)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
    if sc is None:
        sc = {"dense_len": t + 1, "block_size": 64, "window_size": 64}
    o = infllm_v2(q, k, v, sc, q_sel, k_sel).reshape(t, nh * hd)
    if cfg.get("attn_use_output_gate"):
        o = o / (1 + np.exp(-(x @ p("o_gate.weight").T)))
    return o @ p("o_proj.weight").T


def forward(P, cfg, ids):
    """Logits ``[T, V]`` of one sequence (float64)."""
    P = {k: v.astype(np.float64) for k, v in P.items()}
    n, eps = cfg["num_hidden_layers"], cfg["rms_norm_eps"]
    mixers = cfg.get("mixer_types") or ["minicpm4"] * n
    rs = cfg["scale_depth"] / math.sqrt(n)
    x = P["model.embed_tokens.weight"][ids] * cfg["scale_emb"]
    for i, kind in enumerate(mixers):

        def p(name, i=i):
            return P[f"model.layers.{i}.self_attn.{name}"]

        def w(name, i=i):
            return P[f"model.layers.{i}.{name}"]

        h = rms_norm(x, w("input_layernorm.weight"), eps)
        x = x + (lightning_layer if kind == "lightning-attn" else softmax_layer)(p, cfg, h) * rs
        h = rms_norm(x, w("post_attention_layernorm.weight"), eps)
        g = h @ w("mlp.gate_proj.weight").T
        x = x + (((g / (1 + np.exp(-g))) * (h @ w("mlp.up_proj.weight").T)) @ w("mlp.down_proj.weight").T) * rs
    x = rms_norm(x, P["model.norm.weight"], eps)
    return (x / (cfg["hidden_size"] / cfg["dim_model_base"])) @ P.get(
        "lm_head.weight", P["model.embed_tokens.weight"]
    ).T
