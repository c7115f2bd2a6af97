"""Atomic directory writes and safetensors shard planning (single file or sharded + index).

Paths go through ``minicpm_jax.paths``: locally ``atomic_directory`` ends in one atomic rename; on
``gs://``, ``s3://`` or ``memory://`` the same steps run, but a directory "rename" is a copy then a
delete, so the target is complete when the block returns yet is not replaced atomically (a reader
during the move can see it partly written).
"""

from __future__ import annotations

import contextlib
import json
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import jax

from minicpm_jax import distributed
from minicpm_jax.paths import as_path, replace, rmtree

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


@contextlib.contextmanager
def atomic_directory(target: str | Path, replaceable: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a temp dir beside ``target``; on success it replaces ``target``, on error it is removed.

    An existing non-empty ``target`` is replaced only when ``replaceable(target)`` says it is an earlier
    output of the same kind (e.g. a checkpoint being rewritten); anything else raises ``FileExistsError``
    before any work, so a wrong output path never deletes a user's files. Leftovers of an interrupted
    earlier write (``.<name>.tmp-*`` / ``.<name>.old-*`` beside ``target``) are cleaned up first.

    With several processes (``minicpm_jax.distributed``) all of them enter with the same ``target`` and
    get the same temp dir (named by the process count, not a uuid); process 0 alone creates, renames
    and removes, between barriers.
    """
    target = as_path(target)
    if distributed.multiprocess():
        with _shared_directory(target, replaceable) as tmp:
            yield tmp
        return
    _clean_leftovers(target)
    _check_target(target, replaceable)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        rmtree(tmp)
        raise
    _replace(target, tmp, target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}"))


def _check_target(target: Path, replaceable: Callable[[Path], bool] | None) -> None:
    if target.is_file() or (target.is_dir() and any(target.iterdir()) and not (replaceable and replaceable(target))):
        what = (
            "a file"
            if target.is_file()
            else f"a non-empty directory ({', '.join(sorted(p.name for p in target.iterdir())[:5])})"
        )
        raise FileExistsError(
            f"{target} is {what} that is not an earlier output of this kind; choose a new or empty directory "
            "(nothing was written)"
        )


def _replace(target: Path, tmp: Path, old: Path) -> None:
    if target.exists():
        replace(target, old)
    replace(tmp, target)
    rmtree(old)


@contextlib.contextmanager
def _shared_directory(target: Path, replaceable) -> Iterator[Path]:
    """``atomic_directory`` for all processes of a multi-host run at once."""
    main, tag = distributed.is_main(), f"p{jax.process_count()}"
    tmp, old = (target.with_name(f".{target.name}.{kind}-{tag}") for kind in ("tmp", "old"))
    if main:
        _clean_leftovers(target)
    distributed.barrier(f"atomic_directory.clean:{target}")
    _check_target(target, replaceable)
    if main:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    distributed.barrier(f"atomic_directory.open:{target}")
    try:
        yield tmp
    except BaseException:
        if main:
            rmtree(tmp)
        raise
    distributed.barrier(f"atomic_directory.written:{target}")
    if main:
        _replace(target, tmp, old)
    distributed.barrier(f"atomic_directory.done:{target}")


def _clean_leftovers(target: Path) -> None:
    """Remove the temp dirs of interrupted writes; an ``.old-*`` copy is put back if ``target`` is missing."""
    if not target.parent.is_dir():
        return
    for old in sorted(target.parent.glob(f".{target.name}.old-*")):
        if not target.exists():
            replace(old, target)
        else:
            rmtree(old)
    for tmp in target.parent.glob(f".{target.name}.tmp-*"):
        rmtree(tmp)


def is_hf_checkpoint(directory: str | Path) -> bool:
    """A Hugging Face checkpoint directory: ``config.json`` and safetensors weights."""
    directory = as_path(directory)
    return (directory / "config.json").is_file() and any(directory.glob("*.safetensors"))


def plan_shards(sizes: Mapping[str, int], max_shard_bytes: int) -> list[tuple[str, list[str]]]:
    """Group tensor names (in order) into files of at most ``max_shard_bytes`` (one tensor may exceed it)."""
    groups: list[list[str]] = [[]]
    used = 0
    for name, size in sizes.items():
        if groups[-1] and used + size > max_shard_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    if len(groups) == 1:
        return [(SINGLE_NAME, groups[0])]
    n = len(groups)
    return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", g) for i, g in enumerate(groups)]


def safetensors_names(path: Path) -> list[str]:
    """The tensor names of a safetensors file, from its header (an 8-byte little-endian length, then
    that many bytes of JSON), read through the path layer without fetching the tensors. A damaged
    header raises ``SafetensorError``, as ``safe_open`` does."""
    from safetensors import SafetensorError

    with path.open("rb") as f:
        size = int.from_bytes(f.read(8), "little")
        raw = f.read(size)
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise SafetensorError(f"{path}: invalid safetensors header ({e})") from None
    if len(raw) != size or not isinstance(header, dict):
        raise SafetensorError(f"{path}: invalid safetensors header")
    return [name for name in header if name != "__metadata__"]


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def tensor_files(directory: str | Path) -> dict[str, Path]:
    """``{tensor name: file}`` of a checkpoint directory (index, single file, or none found -> error)."""
    directory = as_path(directory)
    index = directory / INDEX_NAME
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: directory / f for k, f in weight_map.items()}
    single = directory / SINGLE_NAME
    if single.is_file():
        return dict.fromkeys(safetensors_names(single), single)
    raise FileNotFoundError(f"{directory}: no {INDEX_NAME} or {SINGLE_NAME} found")
