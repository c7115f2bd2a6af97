"""``interpret=None`` for the Pallas kernels: decided when the computation is lowered, not traced.

``call_kernel(kernel, interpret, *args)`` runs ``kernel(*args, interpret=interpret)`` for an explicit
``interpret`` (``True``/``False`` or ``pltpu.InterpretParams``). With ``interpret=None`` it traces
both ``kernel(*args, interpret=True)`` and ``kernel(*args, interpret=False)`` into one
``jax.lax.platform_dependent``: lowering for CPU keeps only the interpreted kernel, lowering for
any other platform (``jax.export(..., platforms=["cuda"])`` or ``["tpu"]`` from a CPU host, or a
plain ``jit`` on the accelerator) keeps only the compiled one. Callers pass every array through
``args`` (pytrees, ``None`` allowed) and bind static options with ``functools.partial``.
"""

import functools

import jax


def call_kernel(kernel, interpret, *args):
    if interpret is not None:
        return kernel(*args, interpret=interpret)
    return jax.lax.platform_dependent(
        *args,
        cpu=functools.partial(kernel, interpret=True),
        default=functools.partial(kernel, interpret=False),
    )
