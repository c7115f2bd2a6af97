"""Hugging Face interop of MiniCPM-SALA: export -> import identity, key set and config.json vs the spec."""

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from minicpm_jax.config import load_config
from minicpm_jax.config.hf import SALA_ONLY_FIELDS, model_config_to_hf
from minicpm_jax.interop import load_hf_checkpoint, save_hf_checkpoint
from minicpm_jax.interop.layout import layout, param_variables
from minicpm_jax.model import abstract_model, create_model, param_count

OFFICIAL = Path(__file__).resolve().parents[1] / "data" / "minicpm-sala-9b.config.json"
SPARSE = ("q_proj", "k_proj", "v_proj", "o_proj", "o_gate")  # spec/sala.md 1.9
LIGHTNING = ("q_proj", "k_proj", "v_proj", "o_proj", "z_proj", "q_norm", "k_norm", "o_norm")
COMMON = ("input_layernorm", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def _expected_keys(mixers):
    keys = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    for i, kind in enumerate(mixers):
        keys |= {f"model.layers.{i}.{n}.weight" for n in COMMON}
        keys |= {f"model.layers.{i}.self_attn.{n}.weight" for n in (SPARSE if kind == "minicpm4" else LIGHTNING)}
    return keys


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize("preset", ["tiny-sala", "tiny-minicpm4-sparse"])
def test_export_import_identity(preset, tmp_path):
    cfg = load_config(preset).model
    model = create_model(cfg, seed=9, dtype=jnp.float32)
    save_hf_checkpoint(model, cfg, tmp_path / "a", dtype="float32")
    cfg2, model2 = load_hf_checkpoint(tmp_path / "a", dtype=jnp.float32, attention_impl="reference")
    assert cfg2 == cfg
    assert model2.model.layers[0].self_attn.implementation == "reference"
    for (p, a), (_, b) in zip(param_variables(model), param_variables(model2), strict=True):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(p))
    save_hf_checkpoint(model2, cfg2, tmp_path / "b", dtype="float32")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")


def test_tiny_sala_keys_and_config_json(tmp_path):
    cfg = load_config("tiny-sala").model
    out = save_hf_checkpoint(create_model(cfg, dtype=jnp.float32), cfg, tmp_path / "ck", dtype="bfloat16")
    assert set(layout(abstract_model(cfg))) == _expected_keys(cfg.layer_mixers)
    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == "minicpm_sala" and hf["architectures"] == ["MiniCPMSALAForCausalLM"]
    assert (
        hf["auto_map"]["AutoModelForCausalLM"] == "openbmb/MiniCPM-SALA--modeling_minicpm_sala.MiniCPMSALAForCausalLM"
    )
    assert hf["mixer_types"] == list(cfg.layer_mixers) and hf["tie_word_embeddings"] is False
    assert hf["sparse_config"] == {
        "kernel_size": 8,
        "kernel_stride": 4,
        "init_blocks": 1,
        "block_size": 16,
        "window_size": 32,
        "topk": 4,
        "use_nope": False,
        "dense_len": 64,
    }
    for key in set(SALA_ONLY_FIELDS) - {"mixer_types", "shift_labels"}:  # mixer_types is checked above
        assert hf[key] == getattr(cfg, key), key


def test_sala_9b_layout_count_and_config_match_the_official_release():
    cfg = load_config("minicpm-sala-9b").model
    entries = layout(abstract_model(cfg))
    assert set(entries) == _expected_keys(cfg.layer_mixers)
    shapes = {k: e.hf_shape for k, e in entries.items()}
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (256, 4096)  # sparse: GQA 32/2
    assert shapes["model.layers.0.self_attn.o_gate.weight"] == (4096, 4096)
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (4096, 4096)  # lightning: MHA 32x128
    assert shapes["model.layers.1.self_attn.z_proj.weight"] == (4096, 4096)
    assert shapes["model.layers.1.self_attn.q_norm.weight"] == (128,)
    assert shapes["model.layers.1.self_attn.o_norm.weight"] == (4096,)
    assert shapes["lm_head.weight"] == (73448, 4096)
    assert round(param_count(cfg) / 1e9, 2) == 9.48  # spec: 9.477B
    official = json.loads(OFFICIAL.read_text())
    ours = model_config_to_hf(cfg)
    skip = {"auto_map", "dtype", "torch_dtype", "transformers_version"}  # file metadata (auto_map: Hub refs)
    assert {k: v for k, v in ours.items() if k not in skip} == {k: v for k, v in official.items() if k not in skip}
    assert {k: v.split("--")[-1] for k, v in ours["auto_map"].items()} == official["auto_map"]
