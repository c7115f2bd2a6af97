"""What evaluation reads: the model and tokenizer of any checkpoint source, and task data files.

``load_model_and_tokenizer`` takes a native checkpoint, a Hugging Face directory or a preset name
(fresh initialisation, with the byte-level tokenizer, since a preset carries none). Data readers
give one clear error naming the file (and the line, for JSONL) for a missing file or record field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax.numpy as jnp

from minicpm_jax.data.tokenizer import check_vocab, load_tokenizer


def byte_tokenizer():
    """The byte-level tokenizer of training runs (``load_tokenizer(None)``)."""
    return load_tokenizer(None)


def tokenizer_of(source: str | Path):
    """The tokenizer saved with a checkpoint directory; the byte-level one for a preset (none is saved)."""
    return load_tokenizer(source if Path(source).is_dir() else None)


def load_model_and_tokenizer(
    source: str | Path,
    *,
    tokenizer: str | Path | None = None,
    mesh=None,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    seed: int = 0,
):
    """``(model config, model, tokenizer)``; the tokenizer comes from ``tokenizer`` (a directory), else
    the checkpoint directory, else (a preset) the byte-level tokenizer."""
    from minicpm_jax.ckpt import load_any

    tok = load_tokenizer(tokenizer) if tokenizer is not None else tokenizer_of(source)
    cfg, model = load_any(source, mesh=mesh, dtype=dtype, param_dtype=param_dtype, seed=seed)
    check_vocab(tok, cfg.vocab_size, where=f"tokenizer of {tokenizer or source} (--tokenizer DIR)")
    return cfg, model, tok


def resolve_task_paths(options: dict, base: Path) -> dict:
    """``options`` with relative ``path`` / ``paths`` entries resolved beside a recipe in ``base``
    (when the file exists there; else left as given, relative to the working directory)."""

    def one(value: str) -> str:
        path = Path(value)
        return str(base / path) if not path.is_absolute() and (base / path).exists() else value

    out = dict(options or {})
    for key in ("path", "paths"):
        if isinstance(out.get(key), str):
            out[key] = one(out[key])
        elif isinstance(out.get(key), (list, tuple)):
            out[key] = [one(v) for v in out[key]]
    return out


def _check_file(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what}: no such file {str(path)!r}")
    return path


def read_jsonl(path: str | Path, required: tuple[str, ...], *, what: str) -> list[dict[str, Any]]:
    """The objects of a JSONL file (``generate.requests.read_jsonl``), each with the ``required`` keys;
    a missing file raises ``FileNotFoundError``."""
    from minicpm_jax.generate.requests import read_jsonl as read_json_lines

    return read_json_lines(_check_file(path, what), what=what, required=required, empty="no records")


def read_texts(paths: str | Path | list, text_field: str = "text") -> list[str]:
    """Documents of ``.txt`` files (one document per file), JSONL (``text_field`` of each line) or
    Parquet (the ``text_field`` column)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise ValueError("perplexity: option 'paths' is empty (give .txt, .jsonl or .parquet files)")
    texts: list[str] = []
    for p in paths:
        path = _check_file(p, "perplexity data")
        if path.suffix in (".jsonl", ".json"):
            for r in read_jsonl(path, (text_field,), what="perplexity data"):
                if not isinstance(r[text_field], str):
                    raise ValueError(f"perplexity data {path} line {r['_line']}: {text_field!r} is not a string")  # noqa: TRY004
                texts.append(r[text_field])
        elif path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if text_field not in table.column_names:
                raise ValueError(
                    f"perplexity data {path}: no column {text_field!r} (text_field); columns: {table.column_names}"
                )
            texts += [str(t) for t in table.column(text_field).to_pylist() if t is not None]
        else:
            texts.append(path.read_text(encoding="utf-8"))
    return texts
