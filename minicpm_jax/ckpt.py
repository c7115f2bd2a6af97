"""Native model checkpoints: ``model.yaml`` (the model config) + ``params/`` (an orbax checkpoint), and the
tokenizer the model was trained with (its files, or ``byte_tokenizer.json``) + ``generation_config.json``.

Restoring places every parameter directly onto its sharding for the given mesh.

Directories go through ``minicpm_jax.paths``: the orbax ``params/`` checkpoint supports local paths,
``gs://`` and ``s3://`` (``paths.orbax_path`` refuses any other scheme before anything is written);
Hugging Face directories also work on ``memory://``.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
import yaml
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding
from safetensors import SafetensorError, safe_open

from minicpm_jax import distributed
from minicpm_jax.config.loading import build_model_config, load_config
from minicpm_jax.config.schema import ModelConfig
from minicpm_jax.data.tokenizer import save_tokenizer
from minicpm_jax.interop import load_hf_checkpoint
from minicpm_jax.interop.files import atomic_directory
from minicpm_jax.model.decoder import MiniCPMForCausalLM
from minicpm_jax.model.factory import abstract_model, create_model, state_shardings
from minicpm_jax.paths import as_path, glob_files, local_copy, orbax_path, staged_directory

CONFIG_NAME = "model.yaml"


def save_model(
    model: MiniCPMForCausalLM, cfg: ModelConfig, directory: str | Path, *, tokenizer_source: str | Path | None = None
) -> Path:
    """Write the model config and parameters; the directory appears complete or not at all.

    ``tokenizer_source``: a tokenizer directory (or ``tokenizer.json`` file) whose files are copied along,
    ``"byte"`` for the byte-level tokenizer (writes ``byte_tokenizer.json``), or None (no tokenizer).
    With a tokenizer, a ``generation_config.json`` naming its eos id is written unless one was copied.
    In a multi-host run every process calls this (each saves its shards); process 0 writes the other files.
    """
    directory = as_path(directory)
    orbax_path(directory)  # an unsupported scheme fails here, before any work
    with atomic_directory(directory, replaceable=is_native_checkpoint) as tmp:
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(orbax_path(tmp / "params"), nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        checkpointer.wait_until_finished()
        if distributed.is_main():
            with staged_directory(tmp) as files:  # the tokenizer is copied with local paths
                (files / CONFIG_NAME).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
                if tokenizer_source is not None:
                    save_tokenizer(tokenizer_source, files)
    return directory


def is_native_checkpoint(directory: str | Path) -> bool:
    directory = as_path(directory)
    return (directory / CONFIG_NAME).is_file() and (directory / "params").is_dir()


def load_model(
    directory: str | Path, *, mesh: Mesh | None = None, dtype=jnp.bfloat16, param_dtype=jnp.float32, **impls
) -> tuple[ModelConfig, MiniCPMForCausalLM]:
    """``(config, model)`` of a checkpoint written by ``save_model`` (``impls``: attention_impl / lightning_impl)."""
    directory = as_path(directory)
    if not is_native_checkpoint(directory):
        raise FileNotFoundError(f"{directory}: not a minicpm_jax checkpoint (needs {CONFIG_NAME} and params/)")
    cfg = config_of(directory)
    graphdef, state = nnx.split(abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, **impls))
    if mesh is not None:
        shardings = nnx.to_pure_dict(state_shardings(state, mesh))
    else:
        shardings = jax.tree.map(lambda _: SingleDeviceSharding(jax.local_devices()[0]), nnx.to_pure_dict(state))
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), nnx.to_pure_dict(state), shardings
    )
    try:
        restored = ocp.StandardCheckpointer().restore(orbax_path(directory / "params"), target)
    except Exception as e:  # a damaged checkpoint: one clear error naming it
        raise ValueError(f"{directory / 'params'}: unreadable checkpoint ({type(e).__name__}: {_first_line(e)})") from e
    nnx.replace_by_pure_dict(state, restored)
    return cfg, nnx.merge(graphdef, state)


def load_hf(directory: str | Path, **kwargs) -> tuple[ModelConfig, MiniCPMForCausalLM]:
    """``interop.load_hf_checkpoint``, with a truncated or damaged safetensors file named in a ``ValueError``."""
    try:
        return load_hf_checkpoint(directory, **kwargs)
    except SafetensorError as e:
        error = e
        for path in glob_files(as_path(directory) / "*.safetensors"):
            try:
                with local_copy(path) as local, safe_open(local, "numpy") as f:
                    for key in f.keys():  # noqa: SIM118 - safe_open handles are not mappings
                        f.get_slice(key)
            except SafetensorError as bad:
                error = bad
                break
        else:
            path = as_path(directory)
        raise ValueError(f"{path}: unreadable safetensors file ({error})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def config_of(source: str | Path) -> ModelConfig:
    """The model config of a native checkpoint, a Hugging Face directory or a preset, without weights."""
    path = as_path(source)
    if is_native_checkpoint(path):
        return build_model_config(yaml.safe_load((path / CONFIG_NAME).read_text()), str(path / CONFIG_NAME))
    if (path / "config.json").is_file():
        from minicpm_jax.interop.formats import import_config

        return import_config(json.loads((path / "config.json").read_text()))[0]
    return load_config(str(source)).model


def load_any(
    source: str | Path, *, mesh: Mesh | None = None, dtype=jnp.bfloat16, param_dtype=jnp.float32, seed: int = 0, **impls
) -> tuple[ModelConfig, MiniCPMForCausalLM]:
    """A model from a native checkpoint, a Hugging Face directory, or a preset (fresh initialisation)."""
    path = as_path(source)
    if is_native_checkpoint(path):
        return load_model(path, mesh=mesh, dtype=dtype, param_dtype=param_dtype, **impls)
    if (path / "config.json").is_file():
        return load_hf(path, mesh=mesh, dtype=dtype, param_dtype=param_dtype, **impls)
    cfg = load_config(str(source)).model
    return cfg, create_model(cfg, mesh=mesh, seed=seed, dtype=dtype, param_dtype=param_dtype, **impls)
