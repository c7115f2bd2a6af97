"""One path layer for every file the project reads or writes: data globs, metrics, reports, checkpoints,
Hugging Face exports and imports.

``as_path`` turns a string (or path) into a path object with the ``pathlib`` API: a local path becomes an
absolute ``pathlib.Path`` (``~`` expanded, symlinks resolved: exactly what the code did before); a URL
(``gs://``, ``s3://``, ``memory://``, any fsspec protocol) becomes a ``upath.UPath`` that keeps its scheme
and is never resolved against the working directory. ``file://`` URLs are local paths.

Which scheme works for which operation:

* local paths: everything, with atomic renames (``replace``) as before.
* ``gs://`` (needs ``gcsfs``: ``pip install 'minicpm-jax[gcs]'``), ``s3://`` (needs ``s3fs``:
  ``[s3]``), ``memory://`` (fsspec's in-process filesystem, for tests): data globs and reads, metrics,
  reports, safetensors export and import, output checks. A single-object write is atomic on these
  stores (a reader sees the old object or the new one), but a directory rename (``replace`` of a
  directory, ``atomic_directory``) is a copy then a delete, so it is correct but not atomic.
* orbax checkpoints (training checkpoints, native ``model.yaml + params/``): local, ``gs://`` and
  ``s3://`` only (orbax/tensorstore write them; its directory handling goes through ``etils.epath``,
  which needs ``gcsfs``/``s3fs`` too); ``orbax_path`` raises one clear error for any other scheme.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

ORBAX_SCHEMES = ("gs", "s3")  # remote schemes orbax/tensorstore (and etils.epath) can write


def scheme(path) -> str:
    """The URL scheme of ``path`` (``"gs"``, ``"memory"``, ...), ``""`` for a local path."""
    protocol = getattr(path, "protocol", None)
    if protocol is not None:  # a UPath
        protocol = protocol if isinstance(protocol, str) else protocol[0]
        return "" if protocol in ("", "file", "local") else protocol
    text = os.fspath(path)
    if "://" not in text:
        return ""
    name = text.split("://", 1)[0]
    return "" if name in ("file", "local") else name


def is_remote(path) -> bool:
    """True for a URL other than ``file://`` (its operations go through fsspec)."""
    return scheme(path) != ""


def as_path(path) -> Path:
    """A local path as an absolute ``pathlib.Path``; a URL as a ``upath.UPath`` keeping its scheme."""
    if is_remote(path):
        from upath import UPath

        return path if isinstance(path, UPath) else UPath(os.fspath(path))
    text = os.fspath(path)
    if text.startswith(("file://", "local://")):
        text = text.split("://", 1)[1]
    return Path(os.path.expanduser(text)).resolve()


def has_magic(pattern: str) -> bool:
    return glob.has_magic(pattern)


def glob_files(pattern) -> list[Path]:
    """The files (not directories) matching ``pattern``, sorted; ``**`` matches any number of directories
    (zero included) locally and remotely. Names starting with ``.`` are matched only by a pattern
    component that starts with ``.``, as ``glob.glob`` does."""
    pattern = os.fspath(pattern)
    if not is_remote(pattern):
        local = os.path.expanduser(pattern.split("://", 1)[1] if "://" in pattern else pattern)
        return sorted(Path(p) for p in glob.glob(local, recursive=True) if os.path.isfile(p))
    root = as_path(pattern)
    fs = root.fs
    parts = PurePosixPath(root.path).parts
    literal = next((i for i, part in enumerate(parts) if has_magic(part)), len(parts))
    found = fs.glob(root.path, detail=True)
    if isinstance(found, list):  # fsspec returns a list when the pattern has no magic
        found = {p: fs.info(p) for p in found}
    matches = []
    for name, info in found.items():
        if info.get("type") != "file":
            continue
        below = PurePosixPath(name).parts[literal:]
        if any(part.startswith(".") and not _names_dot(parts[literal:], part) for part in below):
            continue
        matches.append(root.with_segments(name))
    return sorted(matches, key=str)


def _names_dot(pattern_parts: tuple[str, ...], part: str) -> bool:
    return any(p.startswith(".") and (p == part or has_magic(p)) for p in pattern_parts)


def replace(src: Path, dst: Path) -> None:
    """Move ``src`` (a file or directory) to ``dst``, replacing a file there. Local: one atomic
    ``os.replace``. Remote: a copy then a delete (correct, not atomic; a directory moves file by file)."""
    if not is_remote(src):
        src.replace(dst)
        return
    fs = src.fs
    if fs.isdir(src.path):
        fs.copy(src.path, dst.path, recursive=True)
        rmtree(src)
    else:
        fs.mv(src.path, dst.path)


def rmtree(path: Path) -> None:
    """Delete the directory ``path`` and everything under it; nothing happens if it is missing."""
    if not is_remote(path):
        shutil.rmtree(path, ignore_errors=True)
        return
    fs = path.fs
    files = fs.find(path.path)
    if files:
        fs.rm(files)
    if fs.exists(path.path):  # pseudo-directories (memory://) outlive their files
        for directory in sorted(fs.find(path.path, withdirs=True), key=len, reverse=True) + [path.path]:
            with contextlib.suppress(FileNotFoundError, OSError):
                fs.rmdir(directory)


def files_under(directory: Path) -> dict[str, Path]:
    """``{relative posix path: path}`` of every file below ``directory``, sorted by name."""
    if not is_remote(directory):
        return {p.relative_to(directory).as_posix(): p for p in sorted(directory.rglob("*")) if p.is_file()}
    root = directory.path.rstrip("/")
    return {name[len(root) + 1 :]: directory.with_segments(name) for name in sorted(directory.fs.find(directory.path))}


@contextlib.contextmanager
def local_copy(path: Path) -> Iterator[Path]:
    """A local file holding ``path``'s bytes (``path`` itself when local; a temp copy, removed after the
    block, when remote), for readers that need a real file (``safetensors.safe_open`` memory-maps)."""
    if not is_remote(path):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="minicpm-jax-") as tmp:
        local = Path(tmp) / path.name
        path.fs.get_file(path.path, str(local))
        yield local


@contextlib.contextmanager
def staged_directory(directory: Path) -> Iterator[Path]:
    """A local directory whose files land in ``directory`` when the block succeeds, for writers that take
    local paths only (tokenizer copies): ``directory`` itself when local; for a remote one, a temp dir
    whose files are uploaded one by one afterwards (replacing files of the same name), then removed."""
    if not is_remote(directory):
        yield directory
        return
    with tempfile.TemporaryDirectory(prefix="minicpm-jax-") as tmp:
        yield Path(tmp)
        for name, local in files_under(Path(tmp)).items():
            target = directory / name
            target.parent.mkdir(parents=True, exist_ok=True)
            directory.fs.put_file(str(local), target.path)


def orbax_path(path):
    """``path`` as orbax takes it: a local ``pathlib.Path`` or an ``etils.epath.Path`` for ``gs://`` /
    ``s3://``; any other scheme raises ``ValueError`` (orbax and tensorstore cannot write there)."""
    if not is_remote(path):
        return path
    if scheme(path) not in ORBAX_SCHEMES:
        raise ValueError(
            f"{path}: orbax checkpoints support local paths, gs:// and s3:// only, not {scheme(path)}://; "
            "choose another checkpoint directory"
        )
    from etils import epath

    return epath.Path(str(path))
