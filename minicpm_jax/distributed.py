"""Multi-host runs on JAX's multi-controller runtime (``jax.distributed``): one process per host, all
running the same command.

``initialize`` (called by the command line before any other JAX call) starts the runtime from
``--coordinator ADDR --num-processes N --process-id I``, or with no arguments (JAX detects Cloud TPU,
SLURM, Open MPI and Kubernetes) when ``--distributed`` is given or a multi-process SLURM / Open MPI
launch is seen in the environment. The helpers below are no-ops in a single-process run.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

HEARTBEAT_TIMEOUT = 100  # seconds (JAX's default)


def add_arguments(parser) -> None:
    g = parser.add_argument_group("multi-host (jax.distributed; run the same command on every host)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0's coordinator service")
    g.add_argument("--num-processes", type=int, metavar="N", help="number of processes (hosts)")
    g.add_argument("--process-id", type=int, metavar="I", help="this process's index, 0..N-1")
    g.add_argument(
        "--distributed",
        action="store_true",
        help="jax.distributed.initialize() with no arguments (Cloud TPU pod, SLURM, Open MPI, Kubernetes)",
    )
    g.add_argument(
        "--heartbeat-timeout",
        type=int,
        default=HEARTBEAT_TIMEOUT,
        metavar="SECONDS",
        help=f"a host silent this long is taken as dead and every other host aborts (default {HEARTBEAT_TIMEOUT})",
    )


def _launched_by_cluster() -> bool:
    """A multi-process launch that JAX's cluster detection reads without arguments (``srun``, ``mpirun``)."""
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_STEP_ID" in os.environ
    return slurm or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    auto: bool = False,
    heartbeat_timeout: int = HEARTBEAT_TIMEOUT,
) -> bool:
    """Start ``jax.distributed`` once; True if it was started. Explicit arguments go together."""
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit) and any(v is None for v in explicit):
        raise ValueError("--coordinator, --num-processes and --process-id must be given together")
    if jax.distributed.is_initialized():
        return False
    if coordinator is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"--process-id {process_id}: must be in 0..{num_processes - 1} (--num-processes)")
    if coordinator is None and not (auto or _launched_by_cluster()):
        return False
    # Only once jax.distributed really starts: CPU processes need gloo collectives (GPU/TPU use their own).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if heartbeat_timeout < 1:
        raise ValueError(f"--heartbeat-timeout {heartbeat_timeout}: must be >= 1 second")
    jax.distributed.initialize(coordinator, num_processes, process_id, heartbeat_timeout_seconds=heartbeat_timeout)
    return True


def initialize_from_args(args) -> bool:
    return initialize(
        getattr(args, "coordinator", None),
        getattr(args, "num_processes", None),
        getattr(args, "process_id", None),
        auto=getattr(args, "distributed", False),
        heartbeat_timeout=getattr(args, "heartbeat_timeout", HEARTBEAT_TIMEOUT),
    )


def abandon(code: int) -> None:
    """End this process now with ``code``, skipping ``jax.distributed``'s shutdown barrier: a host that
    fails alone would otherwise wait there (300 s) while the others wait for it in their next
    collective. The others stop once its heartbeats are missed (``--heartbeat-timeout``); committed
    checkpoints are untouched (each one is committed atomically)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def is_main() -> bool:
    """Process 0: the one that writes logs, metrics, reports and exports."""
    return jax.process_index() == 0


def multiprocess() -> bool:
    return jax.process_count() > 1


def barrier(name: str) -> None:
    """Every process waits here until all arrive (a no-op in a single-process run)."""
    if multiprocess():
        multihost_utils.sync_global_devices(name)


def preempted(step: int) -> bool:
    """True on every process at the same step once any host got SIGTERM (JAX's preemption sync
    service; call it at every step from the same start step). Always False with one process."""
    return multiprocess() and multihost_utils.reached_preemption_sync_point(step)


def check_rows(mesh) -> None:
    """``ValueError`` unless every ``data x fsdp`` row group of ``mesh`` (its ``tensor x sequence``
    devices) lies in one process: each process feeds its own rows, so no two may share a group."""
    groups = np.asarray(mesh.devices).reshape(mesh.shape["data"] * mesh.shape["fsdp"], -1)
    split = [i for i, group in enumerate(groups) if len({d.process_index for d in group}) > 1]
    if split:
        raise ValueError(
            f"mesh {dict(mesh.shape)}: {len(split)} data x fsdp row group(s) span several processes; each "
            f"process feeds its own rows, so tensor x sequence ({groups.shape[1]} devices) must fit in one "
            "process's devices (move the parallelism across hosts to mesh.data or mesh.fsdp)"
        )


def to_host(x: jax.Array) -> np.ndarray:
    """The whole value of ``x`` on this host; an array spread over several hosts is gathered (a
    collective: every process calls it, in the same order)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def spans_processes(mesh) -> bool:
    """Whether ``mesh`` (or None: one local device) holds devices of other processes than this one."""
    return mesh is not None and any(d.process_index != jax.process_index() for d in np.ravel(mesh.devices))


def owned(index: int) -> bool:
    """Whether work item ``index`` is this process's (round robin over the processes)."""
    return index % jax.process_count() == jax.process_index()


def gather_owned(values: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Entry ``i`` of ``values`` as computed by process ``owner[i]``: every process passes its array
    (its own entries filled) and all get the same result, bit for bit (a collective)."""
    if not multiprocess():
        return values
    values = np.ascontiguousarray(values)
    rows = multihost_utils.process_allgather(values.reshape(-1).view(np.uint8))
    every = np.asarray(rows).view(values.dtype).reshape(jax.process_count(), *values.shape)
    return every[np.asarray(owner), np.arange(len(values))]


def local_rows(batch: dict) -> dict:
    """This process's equal share of the rows of a batch every process holds in full."""
    if not multiprocess():
        return batch
    n, i = jax.process_count(), jax.process_index()
    return {k: v[i * len(v) // n : (i + 1) * len(v) // n] for k, v in batch.items()}


def gather_states(state: dict) -> dict:
    """The JSON states of all processes as ``{"process_states": [...]}`` (the state itself with one)."""
    if not multiprocess():
        return state
    data = np.frombuffer(json.dumps(state).encode(), np.uint8)
    size = int(np.max(multihost_utils.process_allgather(np.int32(data.size))))
    padded = np.zeros(size, np.uint8)
    padded[: data.size] = data
    rows = multihost_utils.process_allgather(padded)
    return {"process_states": [json.loads(bytes(r).rstrip(b"\0")) for r in rows]}


def own_state(saved: dict) -> dict:
    """This process's state from ``gather_states``'s output; a run saved by another number of
    processes cannot continue its data order (``ValueError``)."""
    states = saved.get("process_states") if isinstance(saved, dict) else None
    count = 1 if states is None else len(states)
    if count != jax.process_count():
        raise ValueError(
            f"the checkpoint's data state was saved by {count} process(es), this run has {jax.process_count()}: "
            "resume with the same number of processes, or start a new run (train.resume=fresh)"
        )
    return saved if states is None else states[jax.process_index()]
