"""Training checkpoints with orbax: train state (params, optimizer, step), data-iterator state and the
resolved config, every N steps and on SIGTERM/SIGINT, keeping the last K.

Restoring targets the *current* mesh's shardings, so a run can resume on a different mesh shape.
Every finished checkpoint gets a ``sha256.json`` manifest of its files; a checkpoint whose files do
not match it (or, without a manifest, that cannot be read) is moved aside as ``corrupt-step-*`` with a
warning naming the file, and the previous one is used. A checkpoint that is intact but does not fit
the current run (changed config, other shapes) raises ``ResumeError`` and is never moved.

In a multi-host run every process saves and restores through orbax (one directory, one commit);
process 0 alone writes manifests and moves damaged checkpoints aside.

The directory goes through ``minicpm_jax.paths``: local, ``gs://`` or ``s3://`` (what orbax writes; any
other scheme is refused up front). Manifests are written and checked through the same layer; on an
object store, verifying reads every file of the checkpoint back, and moving a damaged one aside is a
copy then a delete (not atomic).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from minicpm_jax import distributed
from minicpm_jax.paths import as_path, files_under, orbax_path, replace

log = logging.getLogger(__name__)

MANIFEST = "sha256.json"


class ResumeError(ValueError):
    """An intact checkpoint that the current run cannot (or must not) resume from."""


class TrainCheckpointer:
    """``save(step, state, data_state, config)`` / ``restore_latest(abstract_state) -> (state, data, config)``."""

    def __init__(self, directory: str | Path, *, keep: int, async_save: bool = True):
        self.directory = as_path(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
        handlers["config"] = ocp.JsonCheckpointHandler()
        self.manager = ocp.CheckpointManager(orbax_path(self.directory), options=options, item_handlers=handlers)
        self.verified: set[int] = set()  # steps whose manifest matched
        self.unsealed: set[int] = set()  # steps saved by this run that have no manifest yet

    def save(self, step: int, state: dict, data_state: dict, config: dict, *, force: bool = False) -> bool:
        self.wait()  # the previous save is finished (orbax waits too) and gets its manifest
        self.unsealed.add(step)
        return self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state), config=ocp.args.JsonSave(config)
            ),
            force=force,
        )

    def latest_config(self, check: Callable[[int, dict], None] | None = None) -> tuple[int, dict] | None:
        """``(step, saved config)`` of the newest intact checkpoint (damaged ones are moved aside), or None.

        ``check(step, saved_config)`` may refuse the resume by raising ``ResumeError`` (propagated).
        """
        for step in sorted(self.manager.all_steps(), reverse=True):
            problem = None if step in self.verified else verify_manifest(self.directory / str(step))
            if problem is None:
                try:
                    config = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
                except Exception as e:  # noqa: BLE001 - unreadable: moved aside below, loudly
                    problem = f"unreadable ({type(e).__name__}: {_first_line(e)})"
                else:
                    self.verified.add(step)
                    if check is not None:
                        check(step, config["config"])
                    return step, config["config"]
            self._move_aside(step, problem)
        return None

    def restore_latest(
        self, abstract_state: Any, check: Callable[[int, dict], None] | None = None
    ) -> tuple[int, dict, dict, dict] | None:
        """Newest intact checkpoint as ``(step, state, data_state, config)``, or None if there is none."""
        while (found := self.latest_config(check)) is not None:
            step, step_dir = found[0], self.directory / str(found[0])
            try:
                _check_shapes(self.manager.item_metadata(step)["state"], abstract_state, step_dir)
                restored = self.manager.restore(
                    step,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state),
                        data=ocp.args.JsonRestore(),
                        config=ocp.args.JsonRestore(),
                    ),
                )
            except ResumeError:
                raise
            except Exception as e:  # unreadable, unless its files are intact
                if (step_dir / MANIFEST).is_file():
                    raise ResumeError(
                        f"{step_dir}: intact checkpoint that this run cannot restore ({type(e).__name__}: "
                        f"{_first_line(e)})"
                    ) from e
                self._move_aside(step, f"unreadable ({type(e).__name__}: {_first_line(e)})")
                continue
            return step, restored["state"], restored["data"], restored["config"]
        return None

    def _move_aside(self, step: int, problem: str) -> None:
        aside = self.directory / f"corrupt-step-{step}-{int(time.time())}"
        if distributed.is_main():
            replace(self.directory / str(step), aside)
        distributed.barrier(f"minicpm_jax.checkpoint.move_aside:{step}")
        self.manager.reload()
        log.warning(
            "skipping checkpoint step %d in %s: %s; moved it to %s and trying an older one",
            step,
            self.directory,
            problem,
            aside.name,
        )

    def wait(self) -> None:
        """Wait for the save in flight; write the manifests of this run's finished checkpoints."""
        self.manager.wait_until_finished()
        for step in sorted(self.unsealed):
            if distributed.is_main() and (self.directory / str(step)).is_dir():
                write_manifest(self.directory / str(step))
        self.unsealed.clear()

    def close(self) -> None:
        self.manager.close()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """``directory/sha256.json``: ``{relative path: sha256}`` of every file (written via a temp file)."""
    directory = as_path(directory)
    sums = {name: _sha256(p) for name, p in files_under(directory).items() if name != MANIFEST}
    tmp = directory / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(sums, indent=1) + "\n")
    replace(tmp, directory / MANIFEST)


def verify_manifest(directory: Path) -> str | None:
    """None when ``directory`` matches its manifest (or has none), else what is wrong, naming the file."""
    directory = as_path(directory)
    path = directory / MANIFEST
    if not path.is_file():
        return None
    try:
        sums = json.loads(path.read_text())
    except ValueError:
        return f"{path}: unreadable manifest"
    files = files_under(directory)
    for name, digest in sums.items():
        if name not in files:
            return f"{directory / name}: missing"
        if _sha256(files[name]) != digest:
            return f"{directory / name}: checksum mismatch (sha256 differs from {MANIFEST})"
    return None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def _dotted(path) -> str:
    """``opt_state.1.mu.model.embed`` for dict, sequence and attribute keys alike (orbax saves all as dicts)."""
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def _check_shapes(metadata, abstract_state, where: Path) -> None:
    """``ResumeError`` listing the paths whose saved shape differs from the current model's."""
    saved = {_dotted(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(metadata)}
    want = {_dotted(k): tuple(v.shape) for k, v in jax.tree_util.tree_leaves_with_path(abstract_state)}
    diff = sorted(k for k in saved.keys() | want.keys() if saved.get(k) != want.get(k))
    if diff:
        shown = ", ".join(f"{k}: saved {saved.get(k)}, model {want.get(k)}" for k in diff[:4])
        raise ResumeError(
            f"{where}: the checkpoint's state does not fit the current model ({len(diff)} array(s) differ: {shown}"
            f"{', ...' if len(diff) > 4 else ''}); use train.resume=fresh to start a new run here"
        )
