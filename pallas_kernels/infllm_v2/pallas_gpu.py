"""Pallas GPU (Mosaic GPU) block-sparse attention: not provided; XLA is the GPU default.

Why (checked on jax 0.10.2, where a plain ``pl.pallas_call`` on GPU lowers to Mosaic GPU):

1. Data-dependent K/V blocks cannot be expressed through BlockSpecs: the Mosaic GPU lowering
   raises ``NotImplementedError("Scalar prefetch not supported in Mosaic GPU lowering.")`` for a
   ``PrefetchScalarGridSpec``, and requires GMEM-resident blocks to have a trivial index map. The
   only route is a manual ``plgpu.copy_gmem_to_smem`` of ``k.at[pl.ds(block_id * 64, 64)]`` with a
   ``plgpu.Barrier`` inside the kernel.
2. Matrix products: ``jnp.dot`` / ``lax.dot_general`` have no Mosaic GPU lowering
   (``NotImplementedError: Unimplemented primitive in Pallas Mosaic GPU lowering: dot_general``);
   matmuls must be ``plgpu.wgmma`` (Hopper) on swizzled SMEM tiles with an ``ACC`` accumulator.
3. Neither of those primitives runs in interpret mode on CPU: ``copy_gmem_to_smem`` has "No state
   discharge rule", and ``wgmma`` fails to discharge (``ValueError: Did not ask for inval to be
   discharged``); the Mosaic GPU interpreter is private in 0.10.2 and supports a single block.

So a Mosaic GPU kernel could be written and lowered for ``cuda`` but its numerics could not be
tested anywhere in this project's CPU test suite; shipping it unverified would be worse than the
tested XLA path. ``tests/pallas_kernels/infllm_v2/test_infllm_lowering.py`` pins facts 1-3 so a
JAX upgrade that lifts them is noticed. On GPU, ``implementation="auto"`` selects ``xla``.
"""
from __future__ import annotations

REASON = ("pallas_gpu is not implemented for InfLLM v2: Mosaic GPU (jax 0.10.2) has no scalar "
          "prefetch and no dot_general lowering, and its copy/wgmma primitives do not run in "
          "interpret mode, so a kernel could not be tested; use implementation='xla' on GPU "
          "(see pallas_kernels/infllm_v2/pallas_gpu.py)")


def block_sparse_attention(q, k, v, block_idx, *, block_size, interpret=False):
  """Raises NotImplementedError with the reason above (use implementation='xla')."""
  del q, k, v, block_idx, block_size, interpret
  raise NotImplementedError(REASON)
