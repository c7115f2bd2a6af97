"""Bad input raises one clear ``ValueError`` naming the argument."""

import jax
import jax.numpy as jnp
import pytest
from lightning_helpers import LOG_DECAY, inputs

from pallas_kernels.lightning import lightning_attention, lightning_decode_step

Q, K, V, S0 = inputs(8)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(q=Q[0]), "q must be 4-D"),
        (dict(k=K[:, :4]), "k must have the shape of q"),
        (dict(v=V[:1]), "v must be"),
        (dict(q=Q.astype(jnp.int32)), "q must be float32"),
        (dict(v=V.astype(jnp.bfloat16)), "share one dtype"),
        (dict(log_decay=-LOG_DECAY), "strictly negative"),
        (dict(log_decay=LOG_DECAY.at[0].set(0.0)), "strictly negative"),
        (dict(log_decay=LOG_DECAY[:3]), r"log_decay must have shape \[H\]"),
        (dict(log_decay=jnp.asarray([-1, -1, -1, -1])), "log_decay must be float32"),
        (dict(initial_state=S0[:, :2]), "initial_state must have shape"),
        (dict(scale=-1.0), "scale must be a positive"),
        (dict(chunk_size=0), "chunk_size must be a positive int"),
        (dict(implementation="triton"), "implementation must be one of"),
        (dict(implementation="pallas_tpu", interpret=True, chunk_size=12), "multiple of 8"),
    ],
)
def test_bad_inputs(kwargs, match):
    args = dict(q=Q, k=K, v=V, log_decay=LOG_DECAY)
    args.update({n: kwargs.pop(n) for n in list(kwargs) if n in args})
    with pytest.raises(ValueError, match=match):
        lightning_attention(args["q"], args["k"], args["v"], args["log_decay"], **kwargs)


@pytest.mark.parametrize(
    "dtype,dims,chunk,match",
    [
        (jnp.float32, 64, 64, "bfloat16/float16 inputs"),
        (jnp.bfloat16, 64, 32, "chunk_size for pallas_gpu must be 64"),
        (jnp.bfloat16, 48, 64, "head dims"),
    ],
)
def test_pallas_gpu_limits(dtype, dims, chunk, match):
    q, k, v, _ = inputs(8, dk=dims, dv=dims, dtype=dtype)
    with pytest.raises(ValueError, match=match):
        lightning_attention(q, k, v, LOG_DECAY, implementation="pallas_gpu", interpret=True, chunk_size=chunk)


def test_bf16_pallas_tpu_chunk_tiling():
    with pytest.raises(ValueError, match="multiple of 16"):
        lightning_attention(
            Q.astype(jnp.bfloat16),
            K.astype(jnp.bfloat16),
            V.astype(jnp.bfloat16),
            LOG_DECAY,
            implementation="pallas_tpu",
            interpret=True,
            chunk_size=8,
        )


@pytest.mark.parametrize(
    "impl,dtype,dims,chunk,platform,marker",
    [
        ("pallas_tpu", jnp.float32, (16, 8), 8, "tpu", "tpu_custom_call"),
        ("pallas_gpu", jnp.bfloat16, (64, 64), 64, "cuda", "mosaic_gpu_v2"),
    ],
)
def test_interpret_none_is_decided_at_lowering(impl, dtype, dims, chunk, platform, marker):
    """A Pallas kernel off its backend no longer raises with interpret=None: on CPU it runs
    interpreted (bitwise the interpret=True result, forward and gradients), and the same function
    exported for the kernel's platform lowers the compiled kernel (no interpret argument)."""
    q, k, v, s0 = inputs(8, b=1, h=2, dk=dims[0], dv=dims[1], dtype=dtype)

    def loss(q, k, v, s0, **kw):
        o, s = lightning_attention(
            q,
            k,
            v,
            LOG_DECAY[:2],
            initial_state=s0,
            return_final_state=True,
            implementation=impl,
            chunk_size=chunk,
            **kw,
        )
        return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(s)

    grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
    interp = jax.jit(jax.value_and_grad(lambda *a: loss(*a, interpret=True), argnums=(0, 1, 2, 3)))
    for got, want in zip(jax.tree.leaves(grad(q, k, v, s0)), jax.tree.leaves(interp(q, k, v, s0))):
        assert jnp.array_equal(got, want)
    assert "platform_index" in str(jax.make_jaxpr(loss)(q, k, v, s0))
    assert "platform_index" not in str(jax.make_jaxpr(lambda *a: loss(*a, interpret=True))(q, k, v, s0))
    text = jax.export.export(grad, platforms=[platform])(q, k, v, s0).mlir_module()
    assert text.count(f"stablehlo.custom_call @{marker}(") >= 2  # forward and backward kernels


def test_decode_bad_inputs():
    with pytest.raises(ValueError, match="q_t must be 3-D"):
        lightning_decode_step(Q[:, 0:1], K[:, 0], V[:, 0], LOG_DECAY, S0)
    with pytest.raises(ValueError, match="state must have shape"):
        lightning_decode_step(Q[:, 0], K[:, 0], V[:, 0], LOG_DECAY, S0[..., :3])
    with pytest.raises(ValueError, match="strictly negative"):
        lightning_decode_step(Q[:, 0], K[:, 0], V[:, 0], jnp.zeros(4), S0)
