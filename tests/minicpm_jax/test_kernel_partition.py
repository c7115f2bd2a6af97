"""Kernels under ``shard_map`` (``minicpm_jax.model.partition``) on 8 fake devices: sharded forward,
gradient and decode equal the unsharded ones, every kernel call is a manual (``shard_map``) region
of the lowered program, and the compiled program all-gathers no q/k/v or Lightning state, also where
``tensor`` > KV heads splits GQA groups (InfLLM v2 selection then exchanges partial score sums)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.extend.core import jaxprs_in_params
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from minicpm_jax.config import MeshConfig, load_config
from minicpm_jax.model import create_model
from minicpm_jax.model.attention import Attention
from minicpm_jax.model.lightning import LightningAttention
from minicpm_jax.model.partition import BATCH, HEADS, Partition
from minicpm_jax.sharding import make_mesh
from pallas_kernels.lightning import alibi_slopes, lightning_attention

MESHES = {"d2t4": {"data": 2, "tensor": 4}, "d4f2": {"data": 4, "fsdp": 2}, "d4t2": {"data": 4, "tensor": 2}}
T_DENSE, T_SPARSE, HEAD_DIM = 16, 80, 16  # tiny configs: dense_len 64, head_dim 16
T_SPLIT = 128  # split GQA groups: 8 blocks of 16 > the 6 selected, so the selection's group sums matter
B = 8  # divisible by data x fsdp of every mesh


def gathered_attention_operands(compiled: str, seq: int) -> list[str]:
    """All-gathers of rank >= 4 whose result has the sequence length (or one less: a prefill before
    a decode step) or head_dim among its last two dims: q/k/v and KV caches in any layout, Lightning
    states. Parameters (rank <= 3) and [B, T, hidden] activations never match. Not counted: the
    gradient of the K/V projection weights (replicated over ``tensor``, like the KV heads), which
    gathers dk/dv outside the kernels (its op is the transpose of the projection einsum)."""
    hits = []
    for m in re.finditer(r"= \w+\[([\d,]+)\][^=\n]* all-gather\(.*", compiled):
        dims = [int(d) for d in m.group(1).split(",")]
        if "transpose(jvp(abi,imn->abmn))/dot_general" in m.group(0):
            continue
        if len(dims) >= 4 and ({seq, seq - 1} & set(dims) or HEAD_DIM in dims[-2:]):
            hits.append(m.group(0)[:200])
    return hits


def check_partitioned(mesh, fn, args, seq, manual_regions, split_groups=False):
    """``fn(*args)`` on ``mesh`` equals it without one; returns nothing, asserts the HLO properties
    (``split_groups``: the InfLLM v2 selection adds partial sums within each group by collective-permute)."""
    want = jax.jit(fn)(*args)
    with jax.set_mesh(mesh):
        lowered = jax.jit(fn).lower(*args)
        exe = lowered.compile()
        got = exe(*args)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=2e-5), got, want)
    assert lowered.as_text().count("sdy.manual_computation(") >= manual_regions
    compiled = exe.as_text()
    assert gathered_attention_operands(compiled, seq) == []
    assert not split_groups or "collective-permute" in compiled


def shard_map_specs(fn, *args):
    """``(in_avals, in_specs, out_avals, out_specs)`` of every ``shard_map`` in ``fn``'s jaxpr (nested too)."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "shard_map":
                ins, outs = [v.aval for v in eqn.invars], [v.aval for v in eqn.outvars]
                found.append((ins, eqn.params["in_specs"], outs, eqn.params["out_specs"]))
            for sub in jaxprs_in_params(eqn.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def decode_q_specs(fn, args, shape):
    """Specs of the operands and results of shape ``[B, 1, Hq, D]`` (the decode step's q and output)."""
    return [
        spec
        for ins, in_specs, outs, out_specs in shard_map_specs(fn, *args)
        for avals, specs in ((ins, in_specs), (outs, out_specs))
        for aval, spec in zip(avals, specs)
        if aval.shape == shape
    ]


def shard_rows(mesh, x):
    return jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"), *(None,) * (x.ndim - 1))))


def mixer_loss(mixer, x, positions, cache=None):
    out, cache = mixer(x, positions, None, cache)
    return jnp.sum(out * jnp.cos(jnp.arange(out.size).reshape(out.shape))), cache


def grad_fn(mixer):
    graphdef, state = nnx.split(mixer)

    def f(state, x, positions):
        return jax.value_and_grad(lambda s, x: mixer_loss(nnx.merge(graphdef, s), x, positions)[0], (0, 1))(state, x)

    return f, state


@pytest.mark.parametrize("mesh_name,t", [("d2t4", T_DENSE), ("d4f2", T_DENSE), ("d4t2", T_SPARSE), ("d2t4", T_SPLIT)])
def test_attention_mixer_forward_and_grad(mesh_name, t):
    """Dense (below dense_len) and InfLLM v2 sparse (pallas_tpu, interpreted) prefill, GQA 4:2."""
    cfg = load_config("tiny-minicpm4-sparse").model
    mixer = Attention(
        cfg, init_std=0.1, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32, implementation="pallas_tpu"
    )
    mesh = make_mesh(MeshConfig(**MESHES[mesh_name]))
    x = shard_rows(mesh, jax.random.normal(jax.random.key(1), (B, t, cfg.hidden_size)))
    positions = jnp.broadcast_to(jnp.arange(t), (B, t))
    f, state = grad_fn(mixer)
    # tensor=4 > Hkv=2 splits GQA groups; InfLLM v2 selection sums scores over a whole group: each
    # shard scores its own q heads and adds its group's other partial sums (no q is gathered).
    split_sparse = t >= cfg.sparse_config.dense_len and mesh.shape["tensor"] > cfg.num_key_value_heads
    check_partitioned(mesh, f, (state, x, positions), t, manual_regions=2, split_groups=split_sparse)


def test_lightning_kernel_pallas_under_shard_map():
    """The Pallas TPU Lightning kernel (interpreted), forward and backward, sharded over rows and heads."""
    mesh = make_mesh(MeshConfig(**MESHES["d2t4"]))
    h, t = 4, 32
    q, k, v = (shard_rows(mesh, jax.random.normal(jax.random.key(i), (B, t, h, HEAD_DIM))) for i in range(3))
    log_decay = -jnp.asarray(alibi_slopes(h))

    def loss(q, k, v):
        part, spec = Partition(B, h), P(BATCH, None, HEADS, None)
        fn = lambda q, k, v, g: lightning_attention(
            q, k, v, g, implementation="pallas_tpu", interpret=True, chunk_size=16
        )
        return jnp.sum(jnp.sin(part(fn, (spec, spec, spec, P(HEADS)), spec)(q, k, v, log_decay)))

    check_partitioned(mesh, jax.value_and_grad(loss, (0, 1, 2)), (q, k, v), t, manual_regions=2)


@pytest.mark.parametrize("mesh_name", ["d2t4", "d4f2"])
def test_lightning_mixer_forward_grad_and_decode(mesh_name):
    cfg = load_config("tiny-sala").model
    mixer = LightningAttention(cfg, init_std=0.1, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    mesh = make_mesh(MeshConfig(**MESHES[mesh_name]))
    t = 24
    x = shard_rows(mesh, jax.random.normal(jax.random.key(1), (B, t, cfg.hidden_size)))
    positions = jnp.broadcast_to(jnp.arange(t), (B, t))
    f, state = grad_fn(mixer)
    check_partitioned(mesh, f, (state, x, positions), t, manual_regions=2)

    graphdef = nnx.graphdef(mixer)

    def prefill_decode(state, x):  # chunked prefill of t - 1 tokens from the cache, then one decode step
        m = nnx.merge(graphdef, state)
        cache = m.init_cache(B, t, jnp.float32)
        o1, cache = m(x[:, :-1], positions[:, :-1], None, cache)
        o2, cache = m(x[:, -1:], positions[:, -1:], None, cache)
        return o1, o2, cache.state

    check_partitioned(mesh, prefill_decode, (state, x), t, manual_regions=2)


SALA_2 = ["model.num_hidden_layers=2", "model.mixer_types=[minicpm4, lightning-attn]"]  # one layer of each kind
MODELS = [  # (preset, overrides, mesh, length, whether InfLLM v2 shards split GQA groups)
    ("tiny-minicpm4", [], "d2t4", T_DENSE, False),
    ("tiny-minicpm4-sparse", [], "d4t2", T_SPARSE, False),
    ("tiny-minicpm4-sparse", [], "d2t4", T_SPLIT, True),
    ("tiny-sala", SALA_2, "d4f2", T_SPARSE, False),
]


@pytest.mark.parametrize("name,overrides,mesh_name,t,split_groups", MODELS)
def test_model_forward_grad_and_decode(name, overrides, mesh_name, t, split_groups):
    """Whole models (dense MiniCPM4, sparse MiniCPM4 above dense_len, hybrid SALA): logits, gradient,
    prefill + decode step sharded == unsharded, each layer's kernels in manual regions, no gathers of
    q/k/v (split groups too: the sparse selection and decode step add partial group scores across the
    group's shards, and the decode step keeps its query heads sharded over ``tensor``)."""
    cfg = load_config(name, overrides).model
    mesh = make_mesh(MeshConfig(**MESHES[mesh_name]))
    kw = {"seed": 3, "dtype": jnp.float32}  # "auto" kernels: "xla" on CPU (Pallas: the mixer tests above)
    sharded, plain = create_model(cfg, mesh=mesh, **kw), create_model(cfg, **kw)
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (B, t)))
    graphdef = nnx.graphdef(plain)
    layers = cfg.num_hidden_layers

    def loss(state, ids):
        logits = nnx.merge(graphdef, state)(ids)
        return -jnp.mean(jax.nn.log_softmax(logits)[..., 0]), logits

    def train(state, ids):
        return jax.value_and_grad(loss, has_aux=True)(state, ids)

    want = jax.jit(train)(nnx.state(plain), ids)
    with jax.set_mesh(mesh):
        lowered = jax.jit(train).lower(nnx.state(sharded), ids)
        exe = lowered.compile()
        got = exe(nnx.state(sharded), ids)
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-4)
    jax.tree.map(close, got, want)
    assert lowered.as_text().count("sdy.manual_computation(") >= 2 * layers  # forward and backward of each
    compiled = exe.as_text()
    assert gathered_attention_operands(compiled, t) == []
    assert not split_groups or "collective-permute" in compiled

    def generate(state, ids):
        m = nnx.merge(graphdef, state)
        logits, cache = m.prefill(ids[:, :-1], m.init_cache(B, t))
        step, cache = m.decode_step(ids[:, -1], cache)
        return logits, step

    want = jax.jit(generate)(nnx.state(plain), ids)
    with jax.set_mesh(mesh):
        lowered = jax.jit(generate).lower(nnx.state(sharded), ids)
        exe = lowered.compile()
        got = exe(nnx.state(sharded), ids)
    jax.tree.map(close, got, want)
    assert lowered.as_text().count("sdy.manual_computation(") >= 2 * layers  # prefill and decode of each
    compiled = exe.as_text()
    assert gathered_attention_operands(compiled, t) == []
    assert not split_groups or "collective-permute" in compiled
    if mesh.shape.get("tensor", 1) > 1:  # the decode step's q and output: heads over tensor, split groups too
        with jax.set_mesh(mesh):
            shape = (B, 1, cfg.num_attention_heads, cfg.attn_head_dim)
            specs = decode_q_specs(generate, (nnx.state(sharded), ids), shape)
        assert len(specs) >= 2 * cfg.layer_mixers.count("minicpm4")
        assert all(spec[2] == "tensor" for spec in specs), specs


@pytest.mark.parametrize("heads,kv_heads", [(8, 2), (16, 4), (8, 8)])
def test_group_sum_adds_the_shards_of_a_group(heads, kv_heads):
    """tensor=8: groups split over 4 or 2 shards (or not split: identity); each shard of a group gets
    the same sum of the group's partial sums (bit-identical), and kv_heads names the group's KV head."""
    mesh = make_mesh(MeshConfig(fsdp=1, tensor=8))
    x = jax.random.normal(jax.random.key(0), (8, 3, 5))  # one partial sum [3, 5] per shard
    with jax.set_mesh(mesh):
        part = Partition(1, heads, kv_heads)

        def shard(x):
            start = part.kv_heads()
            return part.group_sum(x), jnp.full((1,), -1 if start is None else start[0])

        got, kv = jax.jit(part(shard, (P(HEADS),), (P(HEADS), P(HEADS))))(x)
    r = 8 // kv_heads if heads // kv_heads > heads // 8 else 1
    want = np.repeat(np.asarray(x).reshape(8 // r, r, 3, 5).sum(1), r, axis=0)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    for g in range(0, 8, r):
        assert all(np.array_equal(got[g], got[g + j]) for j in range(r))
    assert kv.tolist() == ([-1] * 8 if r == 1 else [d // r for d in range(8)])


def test_sequence_axis_is_refused():
    cfg = load_config("tiny-minicpm4").model
    mixer = Attention(cfg, init_std=0.1, rngs=nnx.Rngs(0), dtype=jnp.float32, param_dtype=jnp.float32)
    x, positions = jnp.zeros((4, 8, cfg.hidden_size)), jnp.broadcast_to(jnp.arange(8), (4, 8))
    mesh = make_mesh(MeshConfig(data=4, sequence=2))
    with jax.set_mesh(mesh), pytest.raises(ValueError, match="mesh axis 'sequence' has size 2"):
        jax.jit(lambda x: mixer(x, positions, None))(x)
