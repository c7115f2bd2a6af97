"""Import a Hugging Face checkpoint directory (official MiniCPM layout or the Llama-folded one).

Everything is checked before anything is loaded (one error lists every missing, unexpected or
mis-shaped tensor); then tensors are read one at a time and placed straight onto their shardings.

The directory goes through ``minicpm_jax.paths``; a remote (``gs://``, ``s3://``, ``memory://``)
safetensors file is first copied to a local temp file (removed after loading) to be memory-mapped.
"""

from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh
from safetensors import safe_open

from minicpm_jax.config.schema import ModelConfig
from minicpm_jax.interop.files import tensor_files
from minicpm_jax.interop.formats import import_config
from minicpm_jax.interop.layout import Entry, from_hf, layout
from minicpm_jax.model.decoder import MiniCPMForCausalLM
from minicpm_jax.model.factory import abstract_model, state_shardings
from minicpm_jax.paths import as_path, local_copy


class CheckpointError(ValueError):
    """A checkpoint that does not match its config; ``problems`` has one line per offending key."""

    def __init__(self, directory, problems: list[str]):
        self.problems = problems
        super().__init__(
            f"checkpoint {directory} does not match its config.json "
            f"({len(problems)} problem(s)):\n  " + "\n  ".join(problems)
        )


def load_hf_checkpoint(
    directory: str | Path,
    *,
    mesh: Mesh | None = None,
    dtype=jnp.bfloat16,
    param_dtype=jnp.float32,
    attention_impl: str = "auto",
    lightning_impl: str = "auto",
) -> tuple[ModelConfig, MiniCPMForCausalLM]:
    """``(config, model)`` from ``config.json`` + ``*.safetensors``; parameters land on ``mesh`` shardings.

    ``attention_impl`` / ``lightning_impl``: the model's kernel choice (runtime options).
    """
    directory = as_path(directory)
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(f"{directory}: no config.json")
    cfg, _ = import_config(json.loads((directory / "config.json").read_text()))
    graphdef, abstract_state = nnx.split(
        abstract_model(
            cfg, dtype=dtype, param_dtype=param_dtype, attention_impl=attention_impl, lightning_impl=lightning_impl
        )
    )
    entries = layout(abstract_state)
    files = tensor_files(directory)
    shardings = dict(nnx.to_flat_state(state_shardings(abstract_state, mesh))) if mesh is not None else {}
    with ExitStack() as stack:
        handles = {
            f: stack.enter_context(safe_open(stack.enter_context(local_copy(f)), "numpy")) for f in set(files.values())
        }
        _check(directory, cfg, entries, {k: tuple(handles[f].get_slice(k).get_shape()) for k, f in files.items()})
        loaded = []
        for key, entry in entries.items():
            host = from_hf(handles[files[key]].get_tensor(key), entry).astype(param_dtype)
            target = shardings[entry.path].get_value() if mesh is not None else None
            loaded.append((entry.path, jax.device_put(host, target)))
    flat = dict(nnx.to_flat_state(abstract_state))
    state = nnx.from_flat_state([(path, flat[path].replace(value)) for path, value in loaded])
    return cfg, nnx.merge(graphdef, state)


def _check(directory, cfg: ModelConfig, entries: dict[str, Entry], shapes: dict[str, tuple]) -> None:
    problems = [
        f"missing tensor {k} (expected shape {list(e.hf_shape)})" for k, e in entries.items() if k not in shapes
    ]
    for key, shape in shapes.items():
        if key in entries:
            if shape != entries[key].hf_shape:
                problems.append(f"tensor {key} has shape {list(shape)}, expected {list(entries[key].hf_shape)}")
        elif not (key == "lm_head.weight" and cfg.tie_word_embeddings):  # tied copies are allowed
            problems.append(f"unexpected tensor {key} {list(shape)}")
    if problems:
        raise CheckpointError(directory, problems)
