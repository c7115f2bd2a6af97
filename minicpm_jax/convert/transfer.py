"""Stage 0 of the conversion: HALO weight transfer from a dense MiniCPM4 model to a hybrid (spec/sala.md 2.2).

Each new Lightning layer takes W_q, W_k, W_v, W_o of the softmax layer it replaces, with K/V
expanded from GQA to full MHA (``repeat_interleave`` over heads: Lightning head i starts from KV
head ``i // (H / H_kv)``, the grouping of GQA itself); its q/k norms and ``o_norm`` are ones (MiniCPM4
has none) and ``z_proj`` is fresh, kaiming-uniform U(+-1/sqrt(hidden)) as PyTorch's ``nn.Linear``.
Retained softmax layers switch to NoPE and gain an ``o_gate`` ~ N(0, initializer_range) (both
configurable: with neither, a hybrid that keeps every layer softmax *is* the teacher). Everything
else (embedding, MLPs, norms, head) is copied.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from minicpm_jax.config.schema import ModelConfig
from minicpm_jax.model.decoder import MiniCPMForCausalLM
from minicpm_jax.model.factory import create_model
from minicpm_jax.sharding import mesh_of

SOFTMAX, LIGHTNING = "minicpm4", "lightning-attn"


def check_teacher(cfg: ModelConfig) -> None:
    """A conversion starts from a dense (all-softmax) MiniCPM4 model."""
    if any(kind != SOFTMAX for kind in cfg.layer_mixers):
        lightning = [i for i, kind in enumerate(cfg.layer_mixers) if kind != SOFTMAX]
        raise ValueError(
            f"convert: the teacher is already a hybrid (Lightning layers {lightning}); conversion starts "
            "from a dense MiniCPM4 checkpoint"
        )


def check_mixer_types(cfg: ModelConfig, mixer_types, require_softmax: bool = True) -> tuple[str, ...]:
    """``mixer_types`` validated against the teacher: one known entry per layer, and (``require_softmax``)
    at least one softmax layer; stage 1 may align an all-Lightning model before selection."""
    mixer_types = tuple(mixer_types)
    n = cfg.num_hidden_layers
    if len(mixer_types) != n:
        raise ValueError(f"convert.mixer_types: has {len(mixer_types)} entries, the teacher has {n} layers")
    bad = sorted({m for m in mixer_types if m not in (SOFTMAX, LIGHTNING)})
    if bad:
        raise ValueError(f"convert.mixer_types: unknown mixer type(s) {bad}; allowed: {[SOFTMAX, LIGHTNING]}")
    if require_softmax and SOFTMAX not in mixer_types:
        raise ValueError("convert.mixer_types: no softmax ('minicpm4') layer; keep at least one")
    return mixer_types


def hybrid_config(
    teacher: ModelConfig,
    mixer_types,
    *,
    nope: bool = True,
    output_gate: bool = True,
    overrides: dict | None = None,
    require_softmax: bool = True,
) -> ModelConfig:
    """The hybrid's config: the teacher's, with ``mixer_types`` and SALA's Lightning layer (full MHA
    at the teacher's head count and head dim, QK-norm, ``o_norm``, ``z_proj`` gate, RoPE), then
    ``overrides`` (fields without parameters, e.g. ``max_position_embeddings``, ``rope_scaling``)."""
    check_teacher(teacher)
    mixer_types = check_mixer_types(teacher, mixer_types, require_softmax)
    nh, hd = teacher.num_attention_heads, teacher.attn_head_dim
    cfg = teacher.model_copy(
        update=dict(
            model_type="minicpm_sala",
            mixer_types=mixer_types,
            head_dim=hd,
            lightning_nh=nh,
            lightning_nkv=nh,
            lightning_head_dim=hd,
            lightning_use_rope=True,
            attn_use_rope=teacher.attn_use_rope and not nope,
            attn_use_output_gate=output_gate,
            qk_norm=True,
            use_output_gate=True,
            use_output_norm=True,
        )
    )
    if overrides:
        from minicpm_jax.config.loading import build_model_config

        return build_model_config({**cfg.model_dump(mode="json"), **overrides}, "convert.model")
    return cfg


def expand_kv(kernel: jax.Array, heads: int) -> jax.Array:
    """``[hidden, H_kv, D]`` -> ``[hidden, heads, D]``: each KV head repeated ``heads / H_kv`` times in place."""
    return jnp.repeat(kernel, heads // kernel.shape[1], axis=1)


def transfer(
    teacher: MiniCPMForCausalLM,
    mixer_types,
    *,
    nope: bool = True,
    output_gate: bool = True,
    overrides: dict | None = None,
    seed: int = 0,
    param_dtype=jnp.float32,
    dtype=None,
    require_softmax: bool = True,
) -> tuple[ModelConfig, MiniCPMForCausalLM]:
    """``(hybrid config, hybrid model)`` with the teacher's weights transferred; placed on the
    teacher's mesh (if sharded). ``seed`` draws the fresh ``z_proj`` / ``o_gate`` weights;
    ``overrides``, ``require_softmax``: see ``hybrid_config``."""
    cfg = hybrid_config(
        teacher.config,
        mixer_types,
        nope=nope,
        output_gate=output_gate,
        overrides=overrides,
        require_softmax=require_softmax,
    )
    hybrid = create_model(
        cfg, mesh=mesh_of(nnx.state(teacher)), seed=seed, dtype=dtype or teacher.dtype, param_dtype=param_dtype
    )
    src = nnx.to_pure_dict(nnx.state(teacher, nnx.Param))
    dst = nnx.to_pure_dict(nnx.state(hybrid, nnx.Param))
    keys = iter(jax.random.split(jax.random.key(seed), 2 * cfg.num_hidden_layers))
    new = {k: v for k, v in src.items() if k != "model"}
    new["model"] = {k: v for k, v in src["model"].items() if k != "layers"}
    new["model"]["layers"] = {}
    for i, kind in enumerate(cfg.layer_mixers):
        t_layer, h_layer = src["model"]["layers"][i], dst["model"]["layers"][i]
        attn = {name: t_layer["self_attn"][name] for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
        if kind == LIGHTNING:
            for name in ("k_proj", "v_proj"):
                attn[name] = {"kernel": expand_kv(attn[name]["kernel"], cfg.lightning_nh)}
            for name in ("q_norm", "k_norm", "o_norm"):
                attn[name] = {"weight": jnp.ones_like(h_layer["self_attn"][name]["weight"])}
            shape = h_layer["self_attn"]["z_proj"]["kernel"].shape
            bound = cfg.hidden_size**-0.5
            attn["z_proj"] = {"kernel": jax.random.uniform(next(keys), shape, param_dtype, -bound, bound)}
        elif output_gate:
            shape = h_layer["self_attn"]["o_gate"]["kernel"].shape
            attn["o_gate"] = {"kernel": cfg.initializer_range * jax.random.normal(next(keys), shape, param_dtype)}
        new["model"]["layers"][i] = {**{k: v for k, v in t_layer.items() if k != "self_attn"}, "self_attn": attn}
    # copies, never aliases: the teacher's buffers must survive the student's donated updates
    placed = jax.tree.map(lambda x, ref: jax.device_put(x, ref.sharding, may_alias=False).astype(ref.dtype), new, dst)
    nnx.update(hybrid, placed)
    return cfg, hybrid


def replace_mixers(model: MiniCPMForCausalLM, source: MiniCPMForCausalLM, layers) -> None:
    """Copy the mixer (``self_attn``) weights of ``layers`` from ``source`` into ``model`` in place
    (both must have the same mixer kind there)."""
    for i in layers:
        target = model.model.layers[i].self_attn
        copied = jax.tree.map(
            lambda x, ref: jax.device_put(x, ref.sharding, may_alias=False).astype(ref.dtype),
            nnx.to_pure_dict(nnx.state(source.model.layers[i].self_attn, nnx.Param)),
            nnx.to_pure_dict(nnx.state(target, nnx.Param)),
        )
        nnx.update(target, copied)
