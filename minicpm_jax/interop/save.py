"""Export to a Hugging Face checkpoint directory: ``config.json``, ``generation_config.json``,
safetensors (sharded + index above ``max_shard_bytes``), tokenizer files. No torch needed.

The host holds one shard's tensors at a time; each parameter is gathered from its devices on its own.
In a multi-host run every process calls ``save_hf_checkpoint`` (each gathers every tensor); process 0
alone writes.

The directory goes through ``minicpm_jax.paths`` (local, ``gs://``, ``s3://``, ``memory://``); a remote
shard is serialized in host memory and written as one object.
"""

from __future__ import annotations

from pathlib import Path

import ml_dtypes
import numpy as np
from flax import nnx
from safetensors.numpy import save, save_file

from minicpm_jax import distributed
from minicpm_jax.config.schema import ModelConfig
from minicpm_jax.data.tokenizer import save_tokenizer
from minicpm_jax.interop.files import INDEX_NAME, atomic_directory, is_hf_checkpoint, plan_shards, write_json
from minicpm_jax.interop.formats import export_config, generation_config
from minicpm_jax.interop.layout import layout, llama_fold_scales, param_variables, to_hf
from minicpm_jax.paths import as_path, is_remote, staged_directory

NUMPY_DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16, "float32": np.float32}


def save_hf_checkpoint(
    model_or_params: nnx.Module | nnx.State,
    config: ModelConfig,
    directory: str | Path,
    *,
    format: str = "minicpm",
    dtype: str = "bfloat16",
    tokenizer_dir: str | Path | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write ``model_or_params`` as a Hugging Face checkpoint; the directory appears complete or not at all."""
    if dtype not in NUMPY_DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not supported; use one of {list(NUMPY_DTYPES)}")
    hf_config = export_config(config, format, dtype)
    entries = layout(model_or_params)
    variables = dict(param_variables(model_or_params))
    sources = {k: (k, 1.0) for k in entries}
    if format == "llama":
        if config.tie_word_embeddings:  # the folded head differs from the folded embedding: untie
            sources["lm_head.weight"] = ("model.embed_tokens.weight", 1.0)
        sources = {k: (src, llama_fold_scales(config, k)) for k, (src, _) in sources.items()}
    itemsize = np.dtype(NUMPY_DTYPES[dtype]).itemsize
    sizes = {k: int(np.prod(entries[src].hf_shape)) * itemsize for k, (src, _) in sources.items()}

    def tensor(key: str) -> np.ndarray:
        src, scale = sources[key]
        host = np.asarray(distributed.to_host(variables[entries[src].path][...]), np.float32)
        if scale != 1.0:
            host = host * np.float32(scale)
        return np.ascontiguousarray(to_hf(host, entries[src]).astype(NUMPY_DTYPES[dtype]))

    with atomic_directory(directory, replaceable=is_hf_checkpoint) as tmp:
        shards = plan_shards(sizes, max_shard_bytes)
        for filename, keys in shards:
            tensors = {k: tensor(k) for k in keys}
            if distributed.is_main() and is_remote(tmp):
                (tmp / filename).write_bytes(save(tensors, metadata={"format": "pt"}))
            elif distributed.is_main():
                save_file(tensors, str(tmp / filename), metadata={"format": "pt"})
        if not distributed.is_main():
            return as_path(directory)
        if len(shards) > 1:
            write_json(
                tmp / INDEX_NAME,
                {
                    "metadata": {"total_size": sum(sizes.values())},
                    "weight_map": {k: f for f, keys in shards for k in keys},
                },
            )
        with staged_directory(tmp) as files:  # the tokenizer is copied with local paths
            write_json(files / "config.json", hf_config)
            write_json(files / "generation_config.json", generation_config(config))
            if tokenizer_dir is not None:  # its generation_config.json wins over ours
                save_tokenizer(tokenizer_dir, files)
    return as_path(directory)
