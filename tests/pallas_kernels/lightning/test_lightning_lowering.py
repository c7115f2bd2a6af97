"""Cross-lowering of the Pallas kernels with ``jax.export`` at SALA's shape (H=32, D=128, T=4096)."""

import jax
import jax.numpy as jnp
import pytest

from pallas_kernels.lightning import alibi_slopes, lightning_attention

B, T, H, D = 1, 4096, 32, 128
TARGETS = {"pallas_tpu": ("tpu", "tpu_custom_call"), "pallas_gpu": ("cuda", "mosaic_gpu_v2")}


def _export(impl, dtype, backward, b=B, t=T, h=H, d=D, segments=False):
    platform, marker = TARGETS[impl]
    log_decay = -jnp.asarray(alibi_slopes(h))

    def fwd(q, k, v, s0, seg=None):
        return lightning_attention(
            q,
            k,
            v,
            log_decay,
            initial_state=s0,
            return_final_state=True,
            implementation=impl,
            interpret=False,
            segment_ids=seg,
        )

    def fwd_bwd(q, k, v, s0, seg=None):
        out, vjp = jax.vjp(lambda *a: fwd(*a, seg), q, k, v, s0)
        return vjp(out)

    x = jax.ShapeDtypeStruct((b, t, h, d), dtype)
    s = jax.ShapeDtypeStruct((b, h, d, d), jnp.float32)
    args = (x, x, x, s) + ((jax.ShapeDtypeStruct((b, t), jnp.int32),) if segments else ())
    exported = jax.export.export(jax.jit(fwd_bwd if backward else fwd), platforms=[platform])(*args)
    return exported, marker


# pallas_gpu takes bf16/fp16 only (fp32 is rejected with a ValueError, tested elsewhere)
CASES = [("pallas_tpu", jnp.float32), ("pallas_tpu", jnp.bfloat16), ("pallas_gpu", jnp.bfloat16)]


@pytest.mark.lowering
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl,dtype", CASES, ids=["tpu-f32", "tpu-bf16", "gpu-bf16"])
def test_export_lowers(impl, dtype, backward):
    exported, marker = _export(impl, dtype, backward)
    text = exported.mlir_module()
    n_kernels = {"pallas_tpu": 2, "pallas_gpu": 4}[impl] if backward else 1
    assert text.count(f"stablehlo.custom_call @{marker}(") == n_kernels  # fwd (+ bwd) kernels
    assert len(exported.serialize()) > 0
    assert exported.out_avals[0].shape == (B, T, H, D)  # o, or dq for the backward


@pytest.mark.lowering
@pytest.mark.parametrize("impl", ["pallas_tpu", "pallas_gpu"])
def test_export_lowers_partial_chunk_and_batch(impl):
    """T not a multiple of the chunk, B > 1, 64-wide heads: forward and backward still lower."""
    exported, marker = _export(impl, jnp.bfloat16, True, b=2, t=1000, h=4, d=64)
    assert exported.mlir_module().count(f"stablehlo.custom_call @{marker}(") >= 2
    assert exported.out_avals[0].shape == (2, 1000, 4, 64)


@pytest.mark.lowering
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("impl,dtype", CASES, ids=["tpu-f32", "tpu-bf16", "gpu-bf16"])
def test_export_lowers_with_segment_ids(impl, dtype, backward):
    """Packed rows (segment_ids [B, T] int32, B = 2): the masked kernels lower at SALA's shape."""
    exported, marker = _export(impl, dtype, backward, b=2, segments=True)
    n_kernels = {"pallas_tpu": 2, "pallas_gpu": 4}[impl] if backward else 1
    assert exported.mlir_module().count(f"stablehlo.custom_call @{marker}(") == n_kernels
    assert len(exported.serialize()) > 0
    assert exported.out_avals[0].shape == (2, T, H, D)
