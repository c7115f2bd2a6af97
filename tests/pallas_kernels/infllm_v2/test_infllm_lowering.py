"""Lowering checks with jax.export at the MiniCPM4-8B shape (no accelerator needed).

Hq=32, Hkv=2, D=128, T=32768, block 64, 96 selected blocks. The Pallas TPU kernels (forward and
backward, with and without segment ids) must lower to Mosaic TPU; on CUDA the XLA path (the GPU
default) must lower, and the GPU Pallas kernel (Triton backend, with and without segment ids) must
lower for cuda; the facts that keep a Mosaic GPU kernel out (see pallas_gpu.py) are pinned.
"""

import pytest
import jax
import jax.numpy as jnp
from jax import export
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.infllm_v2 import InfLLMv2Config, block_sparse_attention, select_blocks

pytestmark = pytest.mark.lowering
B, T, HQ, HKV, D, NSEL = 1, 32768, 32, 2, 128, 96


def _avals(dtype, segments=False):
    return (
        jax.ShapeDtypeStruct((B, T, HQ, D), dtype),
        jax.ShapeDtypeStruct((B, T, HKV, D), dtype),
        jax.ShapeDtypeStruct((B, T, HKV, D), dtype),
        jax.ShapeDtypeStruct((B, HKV, T, NSEL), jnp.int32),
    ) + ((jax.ShapeDtypeStruct((B, T), jnp.int32),) if segments else ())


def _fwd_bwd(impl):
    """fwd(q, k, v, sel[, segment_ids]) and bwd(q, k, v, sel[, segment_ids], do) -> (dq, dk, dv)."""

    def fwd(q, k, v, s, seg=None):
        return block_sparse_attention(q, k, v, s, block_size=64, segment_ids=seg, implementation=impl, interpret=False)

    def bwd(q, k, v, s, *rest):
        *seg, do = rest
        return jax.vjp(lambda q, k, v: fwd(q, k, v, s, *seg), q, k, v)[1](do)

    return fwd, bwd


@pytest.mark.parametrize("dtype,segments", [(jnp.bfloat16, False), (jnp.float32, False), (jnp.bfloat16, True)])
def test_pallas_tpu_lowers(dtype, segments):
    fwd, bwd = _fwd_bwd("pallas_tpu")
    avals = _avals(dtype, segments)
    e = export.export(jax.jit(fwd), platforms=["tpu"])(*avals)
    assert e.mlir_module().count("tpu_custom_call") == 1
    assert e.out_avals[0].shape == (B, T, HQ, D)
    e = export.export(jax.jit(bwd), platforms=["tpu"])(*avals, avals[0])
    assert e.mlir_module().count("tpu_custom_call") == 3  # fwd (residuals), dq, dkv
    assert len(e.serialize()) > 0
    assert [a.shape for a in e.out_avals] == [avals[0].shape, avals[1].shape, avals[2].shape]


@pytest.mark.parametrize("segments", [False, True])
def test_pallas_gpu_triton_lowers_for_cuda(segments):
    """The Triton-backend GPU kernel (fwd + bwd) lowers for cuda; serialising needs the check off."""
    fwd, bwd = _fwd_bwd("pallas_gpu")
    avals = _avals(jnp.bfloat16, segments)
    target = "__gpu$xla.gpu.triton"
    with pytest.raises(ValueError, match="custom calls whose targets have no compatibility"):
        export.export(jax.jit(fwd), platforms=["cuda"])(*avals)
    checks = [export.DisabledSafetyCheck.custom_call(target)]
    e = export.export(jax.jit(fwd), platforms=["cuda"], disabled_checks=checks)(*avals)
    assert e.mlir_module().count(target) == 1 and e.out_avals[0].shape == (B, T, HQ, D)
    e = export.export(jax.jit(bwd), platforms=["cuda"], disabled_checks=checks)(*avals, avals[0])
    assert e.mlir_module().count(target) == 2 and len(e.serialize()) > 0


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_xla_path_and_selection_lower(platform):
    fwd, bwd = _fwd_bwd("xla")
    avals = _avals(jnp.bfloat16)
    e = export.export(jax.jit(bwd), platforms=[platform])(*avals, avals[0])
    assert len(e.serialize()) > 0
    cfg = InfLLMv2Config()
    e = export.export(jax.jit(lambda q, k: select_blocks(q, k, cfg)), platforms=[platform])(*avals[:2])
    assert e.out_avals[0].shape == (B, HKV, T, cfg.num_selected)


def test_mosaic_gpu_limits_documented_in_pallas_gpu():
    """Facts behind pallas_gpu.py using Triton: if one stops holding, revisit Mosaic GPU."""

    def dot_kernel(x_ref, y_ref, o_ref):
        o_ref[...] = jnp.dot(x_ref[...], y_ref[...], preferred_element_type=jnp.float32)

    f = lambda x, y: pl.pallas_call(dot_kernel, out_shape=jax.ShapeDtypeStruct((128, 128), jnp.float32))(x, y)
    x = jax.ShapeDtypeStruct((128, 64), jnp.bfloat16)
    with pytest.raises(NotImplementedError, match="dot_general"):
        export.export(jax.jit(f), platforms=["cuda"])(x, jax.ShapeDtypeStruct((64, 128), jnp.bfloat16))

    def prefetch_kernel(idx_ref, x_ref, o_ref):
        o_ref[...] = x_ref[...]

    spec = pl.BlockSpec((8, 128), lambda i, idx: (idx[i], 0))
    g = lambda idx, x: pl.pallas_call(
        prefetch_kernel,
        out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=1, grid=(1,), in_specs=[spec], out_specs=pl.BlockSpec((8, 128), lambda i, idx: (0, 0))
        ),
    )(idx, x)
    with pytest.raises(NotImplementedError, match="Scalar prefetch not supported"):
        export.export(jax.jit(g), platforms=["cuda"])(
            jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((32, 128), jnp.float32)
        )

    def copy_kernel(idx_ref, x_hbm, o_ref):
        def scope(smem, bar):
            plgpu.copy_gmem_to_smem(x_hbm.at[pl.ds(idx_ref[0] * 8, 8)], smem, bar)
            plgpu.barrier_wait(bar)
            o_ref[...] = smem[...]

        pl.run_scoped(scope, plgpu.SMEM((8, 128), jnp.float32), plgpu.Barrier(num_arrivals=1))

    h = lambda idx, x: pl.pallas_call(
        copy_kernel,
        out_shape=jax.ShapeDtypeStruct((8, 128), jnp.float32),
        interpret=True,
        in_specs=[pl.BlockSpec(memory_space=plgpu.SMEM), pl.BlockSpec(memory_space=plgpu.GMEM)],
    )(idx, x)
    with pytest.raises(NotImplementedError, match="discharge rule"):
        h(jnp.zeros((32,), jnp.int32), jnp.zeros((32, 128), jnp.float32))
