"""Checks the command line makes before any work, so that a bad path fails fast and nothing is lost:
recipe files (YAML with file:line, a non-empty mapping), output targets (never replaced without
``--overwrite``, never one holding the command's source or a training run), and writes that name
their path in every ``OSError`` and leave no temp file.

Output paths go through ``minicpm_jax.paths``, so the checks hold for ``gs://``, ``s3://`` and
``memory://`` outputs too; there ``jsonl_output``'s final move is a copy then a delete (not atomic).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import yaml

from minicpm_jax.config.loading import recipe_path
from minicpm_jax.paths import as_path, replace


@contextlib.contextmanager
def jsonl_output(path: str | Path):
    """A text file that becomes ``path`` when the block succeeds; on any error it is removed."""
    path = as_path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with writing(path), tmp.open("w", encoding="utf-8") as f:
            yield f
        replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def writing(path):
    """Name ``path`` in an ``OSError`` raised without a file name (e.g. ENOSPC from ``write``)."""
    try:
        yield
    except OSError as e:
        if e.filename is None:
            raise OSError(e.errno, f"{e.strerror or e} while writing", str(path)) from e
        raise


def _inside(path: Path, directory: Path) -> bool:
    return path == directory or directory in path.parents


def _training_run(directory: Path) -> Path | None:
    """A training run (``checkpoints/`` or ``metrics.jsonl``) at or up to two levels below ``directory``."""
    for level in (directory, *directory.glob("*"), *directory.glob("*/*")):
        if (level / "checkpoints").is_dir() or (level / "metrics.jsonl").is_file():
            return level
    return None


def check_output(target, *, overwrite: bool, sources=()) -> None:
    """Refuse (``FileExistsError``) an existing non-empty output unless ``overwrite``; even then refuse
    one that contains a source of the command or a training run. (The writers also refuse to replace
    anything but an earlier output of their own kind.)"""
    target = as_path(target)
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return
    if not overwrite:
        raise FileExistsError(f"{target} already exists and is not empty; give --overwrite to replace it")
    for source in sources:
        if source and as_path(source).exists() and _inside(as_path(source), target):
            raise FileExistsError(f"{target} contains the source {source}; choose another output (nothing written)")
    run = _training_run(target) if target.is_dir() else None
    if run is not None:
        raise FileExistsError(f"{target} contains a training run ({run}); choose another output (nothing written)")


RUN_MARKERS = {"convert": ("conversion.json", "stage-0-transfer"), "distill": ("checkpoints", "metrics.jsonl")}


def check_run_dir(output_dir, overwrite: bool, kind: str, sources) -> None:
    """A convert / distill ``output_dir``: new, empty or an earlier run of ``kind`` (resumed); anything
    else needs ``--overwrite`` (files there are kept) and never holds the sources or another run."""
    out = as_path(output_dir)
    if not out.is_dir() or any((out / m).exists() for m in RUN_MARKERS[kind]):
        return
    entries = sorted(p.name for p in out.iterdir())
    if entries and not overwrite:
        raise FileExistsError(
            f"output_dir {out} holds files that are not an earlier {kind} run ({', '.join(entries[:5])}); "
            "choose a new or empty directory, or give --overwrite to write beside them (nothing is deleted)"
        )
    if entries:
        check_output(out, overwrite=True, sources=sources)


def check_recipe_file(path) -> Path:
    """``path`` (or the shipped recipe of that name) if it is a YAML file whose top level is a non-empty
    mapping, else one clear error."""
    path = recipe_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--config: no such file {str(path)!r}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        raise ValueError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    if raw is None:
        raise ValueError(f"{path}: the recipe is empty (expected a mapping of sections such as model:, train:)")
    if not isinstance(raw, dict):
        raise ValueError(  # noqa: TRY004 - a user error (exit 2), not a programming one
            f"{path}: the recipe's top level is a {type(raw).__name__}, expected a mapping of sections"
        )
    return path
