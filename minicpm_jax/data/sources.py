"""Random-access document sources (grain data sources) for each ``data.source``.

A source has ``__len__`` and ``__getitem__(i)``; document ``i`` is a ``str`` (text sources, tokenized
later) or a 1-D ``int32`` array (pre-tokenized ``array`` source). Files are indexed once at start
(byte offsets of JSONL lines, the text column of Parquet files, eos positions of token arrays), so
shuffling and resuming never re-read more than the documents they need.

``data.paths`` go through ``minicpm_jax.paths``: local paths and globs as before, and ``gs://``, ``s3://``
or ``memory://`` URLs (globs with ``**`` included) for the JSONL, Parquet and array sources (a remote
``.npy`` array is read into host memory instead of memory-mapped). ArrayRecord globs are expanded by
the layer, but the files are opened by array_record's own reader, which reads remote URLs only in
builds with that support (open-source releases read local files; otherwise one error says so).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from minicpm_jax.data.synthetic import SyntheticSource
from minicpm_jax.paths import as_path, glob_files, has_magic, is_remote


def resolve_paths(patterns: tuple[str, ...], source: str) -> list[Path]:
    """Files named by ``data.paths`` (plain paths or glob patterns), each pattern matching something."""
    if not patterns:
        raise ValueError(f"data.paths: empty; data.source {source!r} reads files (give paths or globs)")
    files: list[Path] = []
    for pattern in patterns:
        if has_magic(pattern):
            matches = glob_files(pattern)
            if not matches:
                raise FileNotFoundError(f"data.paths: glob {pattern!r} matches no file")
            files += matches
            continue
        path = as_path(pattern)
        if path.is_dir():
            raise ValueError(
                f"data.paths: {pattern!r} is a directory; give files or a glob like '{pattern.rstrip('/')}/*'"
            )
        if not path.is_file():
            raise FileNotFoundError(f"data.paths: no such file {pattern!r}")
        files.append(path)
    return files


def record_text(record: bytes | str, field: str, where: str) -> str:
    """The string ``field`` of a JSON-object record (``where`` names the record in errors)."""
    try:
        obj = json.loads(record)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{where}: not a valid UTF-8 JSON record ({e})") from e
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    text = obj.get(field)
    if not isinstance(text, str):
        raise ValueError(f"{where}: no string field {field!r} (data.text_field); keys: {sorted(obj)}")
    return text


class _MultiFile:
    """Maps a global document index to (file index, index within file) over concatenated files."""

    def __init__(self, files: list[Path], counts: list[int]):
        self.files = files
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def check_first_records(self) -> None:
        """Read each file's first document now, so a wrong ``text_field`` fails at start."""
        for start, end in zip(self._starts[:-1], self._starts[1:]):
            if end > start:
                self[int(start)]

    def locate(self, index: int) -> tuple[int, int]:
        if not 0 <= index < len(self):
            raise IndexError(f"document {index} out of range [0, {len(self)})")
        f = int(np.searchsorted(self._starts, index, side="right")) - 1
        return f, index - int(self._starts[f])


class JsonlSource(_MultiFile):
    """JSON Lines: one document per non-blank line, its text in ``text_field``."""

    def __init__(self, files: list[Path], text_field: str):
        self._field = text_field
        self._offsets = []
        for path in files:
            offsets, pos = [], 0
            with path.open("rb") as fh:
                for line in fh:
                    if line.strip():
                        offsets.append(pos)
                    pos += len(line)
            self._offsets.append(np.asarray(offsets, dtype=np.int64))
        super().__init__(files, [len(o) for o in self._offsets])
        self.check_first_records()

    def __getitem__(self, index: int) -> str:
        f, i = self.locate(index)
        with self.files[f].open("rb") as fh:
            fh.seek(int(self._offsets[f][i]))
            line = fh.readline()
        return record_text(line, self._field, f"{self.files[f]} (document {i})")


class ParquetSource(_MultiFile):
    """Parquet files: one document per row of the string column ``text_field`` (read memory-mapped)."""

    def __init__(self, files: list[Path], text_field: str):
        import pyarrow.parquet as pq

        self._field, self._columns = text_field, []
        for path in files:  # a remote file is read through its file object (its column lands in host memory)
            with path.open("rb") if is_remote(path) else contextlib.nullcontext(path) as source:
                try:
                    names = pq.ParquetFile(source).schema_arrow.names
                except Exception as e:  # pyarrow raises ArrowInvalid / OSError on non-Parquet files
                    raise ValueError(f"data.paths: {path} is not a readable Parquet file: {e}") from e
                if text_field not in names:
                    raise ValueError(f"data.text_field: column {text_field!r} not in {path}; columns: {names}")
                table = pq.read_table(source, columns=[text_field], memory_map=not is_remote(path))
            self._columns.append(table[text_field])
        super().__init__(files, [len(c) for c in self._columns])
        self.check_first_records()

    def __getitem__(self, index: int) -> str:
        f, i = self.locate(index)
        text = self._columns[f][i].as_py()
        if not isinstance(text, str):
            raise ValueError(f"{self.files[f]} row {i}: data.text_field {self._field!r} is not a string: {text!r}")
        return text


class ArrayRecordSource:
    """ArrayRecord files: each record is UTF-8 text, or a JSON object holding ``text_field``."""

    def __init__(self, files: list[Path], text_field: str):
        from grain.sources import ArrayRecordDataSource

        self._field = text_field
        names = [str(p) for p in files]  # URLs stay URLs: the ArrayRecord reader opens them itself
        try:
            self._source = ArrayRecordDataSource(names)
        except Exception as e:  # array_record raises RuntimeError / ValueError on bad files
            hint = (
                "; this array_record build may not read remote files: copy them to a local disk"
                if any(is_remote(p) for p in files)
                else ""
            )
            raise ValueError(f"data.paths: cannot open ArrayRecord files {names}: {e}{hint}") from e
        if len(self._source):
            self[0]  # fail at start on a wrong text_field or a non-UTF-8 record

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> str:
        record, where = self._source[index], f"ArrayRecord record {index}"
        if record.lstrip()[:1] == b"{":
            return record_text(record, self._field, where)
        try:
            return record.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{where}: not UTF-8 text ({e})") from e


class ArraySource(_MultiFile):
    """Pre-tokenized ``.npy`` files: 1-D integer token arrays, documents separated by (and ending
    with) ``eos_id``; a trailing run without eos is a document too. Read memory-mapped."""

    def __init__(self, files: list[Path], eos_id: int, vocab_size: int):
        self._arrays, self._bounds = [], []
        for path in files:
            try:
                if is_remote(path):  # no memory map over an object store: the array is read whole
                    with path.open("rb") as fh:
                        arr = np.load(fh, allow_pickle=False)
                else:
                    arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise ValueError(f"data.paths: {path} is not a readable .npy array: {e}") from e
            if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
                raise ValueError(
                    f"data.paths: {path} holds a {arr.dtype} array of shape {arr.shape}; "
                    "expected a 1-D integer token array"
                )
            if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= vocab_size):
                raise ValueError(
                    f"data.paths: {path} has token ids in [{int(arr.min())}, {int(arr.max())}], "
                    f"outside the model's vocabulary [0, {vocab_size})"
                )
            ends = np.flatnonzero(np.asarray(arr) == eos_id) + 1
            if arr.size and (not ends.size or ends[-1] != arr.size):
                ends = np.append(ends, arr.size)
            self._arrays.append(arr)
            self._bounds.append(np.concatenate([[0], ends]).astype(np.int64))
        super().__init__(files, [len(b) - 1 for b in self._bounds])

    def __getitem__(self, index: int) -> np.ndarray:
        f, i = self.locate(index)
        start, end = self._bounds[f][i], self._bounds[f][i + 1]
        return np.asarray(self._arrays[f][start:end], dtype=np.int32)


def open_source(cfg, *, eos_id: int, vocab_size: int):
    """The document source ``cfg.data`` (a ``DataConfig``) describes; raises if it has no document."""
    if cfg.source == "synthetic":
        source = SyntheticSource(cfg.synthetic_tasks, cfg.synthetic_documents, cfg.seed)
    else:
        files = resolve_paths(cfg.paths, cfg.source)
        if cfg.source == "jsonl":
            source = JsonlSource(files, cfg.text_field)
        elif cfg.source == "parquet":
            source = ParquetSource(files, cfg.text_field)
        elif cfg.source == "arrayrecord":
            source = ArrayRecordSource(files, cfg.text_field)
        elif cfg.source == "array":
            source = ArraySource(files, eos_id, vocab_size)
        else:
            raise ValueError(f"data.source: unknown source {cfg.source!r}")
    if len(source) == 0:
        raise ValueError(
            f"data: empty dataset, data.source {cfg.source!r} with paths {list(cfg.paths)} holds no document"
        )
    return source
