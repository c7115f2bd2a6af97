"""Training checkpoints with orbax: train state (params, optimizer, step), data-iterator state and the
resolved config, every N steps and on SIGTERM/SIGINT, keeping the last K.

Restoring targets the *current* mesh's shardings, so a run can resume on a different mesh shape.
An unreadable newest checkpoint is skipped with a warning and the previous good one is used.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class TrainCheckpointer:
    """``save(step, state, data_state, config)`` / ``restore_latest(abstract_state) -> (state, data, config)``."""

    def __init__(self, directory: str | Path, *, keep: int, async_save: bool = True):
        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data", "config"))

    def save(self, step: int, state: dict, data_state: dict, config: dict, *, force: bool = False) -> bool:
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(config)
            ),
            force=force,
        )

    def restore_latest(self, abstract_state: Any) -> tuple[int, dict, dict, dict] | None:
        """Newest readable checkpoint as ``(step, state, data_state, config)``, or None if there is none."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=ocp.args.JsonRestore(),
                        config=ocp.args.JsonRestore(),
                    ),
                )
                _check_shapes(restored["state"], abstract_state)
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint is skipped, loudly
                aside = self.directory / f"corrupt-step-{step}-{int(time.time())}"
                (self.directory / str(step)).rename(aside)
                self.manager.reload()
                log.warning(
                    "skipping checkpoint step %d in %s: unreadable (%s: %s); moved it to %s and trying an older one",
                    step,
                    self.directory,
                    type(e).__name__,
                    str(e).splitlines()[0][:200],
                    aside.name,
                )
                continue
            return step, restored["state"], restored["data"], restored["config"]
        return None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()


def _check_shapes(state, abstract_state) -> None:
    got = jax.tree.map(lambda x: x.shape, state)
    want = jax.tree.map(lambda x: x.shape, abstract_state)
    if got != want:
        raise ValueError("restored state does not match the model's shapes")
