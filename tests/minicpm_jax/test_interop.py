"""Hugging Face import/export: key layout, round trips, sharding, errors, atomic writes."""

import json

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from minicpm_jax.config import ConfigError, MeshConfig, load_config
from minicpm_jax.interop import CheckpointError, load_hf_checkpoint, save_hf_checkpoint
from minicpm_jax.interop import save as save_module
from minicpm_jax.interop.layout import layout, param_variables
from minicpm_jax.model import abstract_model, create_model
from minicpm_jax.sharding import make_mesh


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_official_05b_key_names_and_shapes():
    """Exactly the key set and [out, in] shapes of spec/minicpm4.md 2.3 (tied: no lm_head.weight)."""
    entries = layout(abstract_model(load_config("minicpm4-0.5b").model))
    expected = {"model.embed_tokens.weight": (73448, 1024), "model.norm.weight": (1024,)}
    per_layer = {
        "input_layernorm.weight": (1024,),
        "self_attn.q_proj.weight": (1024, 1024),
        "self_attn.k_proj.weight": (128, 1024),
        "self_attn.v_proj.weight": (128, 1024),
        "self_attn.o_proj.weight": (1024, 1024),
        "post_attention_layernorm.weight": (1024,),
        "mlp.gate_proj.weight": (4096, 1024),
        "mlp.up_proj.weight": (4096, 1024),
        "mlp.down_proj.weight": (1024, 4096),
    }
    expected.update({f"model.layers.{i}.{k}": s for i in range(24) for k, s in per_layer.items()})
    assert {k: e.hf_shape for k, e in entries.items()} == expected
    untied = layout(abstract_model(load_config("minicpm4-8b").model))
    assert untied["lm_head.weight"].hf_shape == (73448, 4096)
    assert untied["model.layers.31.self_attn.k_proj.weight"].hf_shape == (256, 4096)


@pytest.mark.parametrize("fmt", ["minicpm", "llama"])
def test_export_import_identity_bitwise(fmt, tmp_path):
    cfg = load_config("tiny-minicpm4").model
    model = create_model(cfg, seed=7, dtype=jnp.float32)
    save_hf_checkpoint(model, cfg, tmp_path / "a", format=fmt, dtype="float32")
    cfg2, model2 = load_hf_checkpoint(tmp_path / "a", dtype=jnp.float32)
    save_hf_checkpoint(model2, cfg2, tmp_path / "b", format=fmt, dtype="float32")
    assert _files(tmp_path / "a") == _files(tmp_path / "b")  # export . import . export == export, byte for byte
    ids = jnp.arange(20)[None] % cfg.vocab_size
    if fmt == "minicpm":
        assert cfg2 == cfg
        for (p, a), (_, b) in zip(param_variables(model), param_variables(model2)):
            np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(p))
    else:  # scalars folded: a unit-scalar MiniCPM with the same function
        assert (cfg2.scale_emb, cfg2.residual_scale, cfg2.logit_divisor) == (1.0, 1.0, 1.0)
        np.testing.assert_allclose(model2(ids), model(ids), atol=1e-5)


def test_bf16_export_sharded_with_index_and_tokenizer(tmp_path):
    cfg = load_config("tiny-minicpm4-longrope").model
    model = create_model(cfg, seed=2, dtype=jnp.float32)
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "tokenizer.json").write_text("{}")
    (tok / "tokenizer_config.json").write_text('{"chat_template": "x"}')
    out = save_hf_checkpoint(model, cfg, tmp_path / "ck", tokenizer_dir=tok, max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all(s.endswith(f"-of-{len(shards):05d}.safetensors") for s in shards)
    assert set(index["weight_map"]) == set(layout(model))
    assert index["metadata"]["total_size"] == sum(v.nbytes for s in shards for v in load_file(out / s).values())
    assert load_file(out / shards[0]).popitem()[1].dtype == "bfloat16"
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    hf_config = json.loads((out / "config.json").read_text())
    assert hf_config["auto_map"]["AutoModelForCausalLM"] == "openbmb/MiniCPM4-8B--modeling_minicpm.MiniCPMForCausalLM"
    assert hf_config["auto_map"]["AutoConfig"] == "openbmb/MiniCPM4-8B--configuration_minicpm.MiniCPMConfig"
    assert hf_config["torch_dtype"] == "bfloat16" and hf_config["tie_word_embeddings"] is False
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [2] and gen["bos_token_id"] == 1
    _, loaded = load_hf_checkpoint(out, dtype=jnp.float32)  # bf16 round trip stays close
    ids = jnp.arange(12)[None]
    np.testing.assert_allclose(loaded(ids), model(ids), atol=0.05 * float(jnp.abs(model(ids)).max()))


def test_load_onto_mesh(tmp_path):
    cfg = load_config("tiny-minicpm4").model
    model = create_model(cfg, seed=1, dtype=jnp.float32)
    save_hf_checkpoint(model, cfg, tmp_path / "ck", dtype="float32")
    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
    _, sharded = load_hf_checkpoint(tmp_path / "ck", mesh=mesh, dtype=jnp.float32)
    kernel = sharded.model.layers[0].mlp.up_proj.kernel[...]
    assert kernel.sharding.mesh.shape == mesh.shape and kernel.addressable_shards[0].data.shape == (16, 64)
    np.testing.assert_array_equal(np.asarray(kernel), np.asarray(model.model.layers[0].mlp.up_proj.kernel[...]))


def test_bad_checkpoint_lists_every_problem(tmp_path):
    cfg = load_config("tiny-minicpm4").model
    save_hf_checkpoint(create_model(cfg, dtype=jnp.float32), cfg, tmp_path / "ck", dtype="float32")
    path = tmp_path / "ck" / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.layers.0.self_attn.q_proj.weight"] = np.zeros((3, 64), np.float32)
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.zeros((8,), np.float32)
    save_file(tensors, path)
    with pytest.raises(CheckpointError) as info:
        load_hf_checkpoint(tmp_path / "ck")
    assert sorted(info.value.problems) == [
        "missing tensor model.layers.1.mlp.up_proj.weight (expected shape [128, 64])",
        "tensor model.layers.0.self_attn.q_proj.weight has shape [3, 64], expected [64, 64]",
        "unexpected tensor model.layers.0.self_attn.rotary_emb.inv_freq [8]",
    ]


def test_unsupported_model_type_and_missing_files(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="model_type: 'gpt2' is not supported"):
        load_hf_checkpoint(tmp_path)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_hf_checkpoint(tmp_path / "missing")


def test_failed_write_leaves_previous_checkpoint_untouched(tmp_path, monkeypatch):
    cfg = load_config("tiny-minicpm4").model
    model = create_model(cfg, dtype=jnp.float32)
    save_hf_checkpoint(model, cfg, tmp_path / "ck", dtype="float32")
    before = _files(tmp_path / "ck")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(save_module, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_hf_checkpoint(model, cfg, tmp_path / "ck", dtype="bfloat16")
    assert _files(tmp_path / "ck") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp dirs left behind


def test_llama_format_rejects_sala_and_bad_dtype(tmp_path):
    cfg = load_config("tiny-minicpm4", ["model.attn_use_output_gate=true"]).model
    model = create_model(cfg, dtype=jnp.float32)
    with pytest.raises(ValueError, match="format='llama' needs a dense MiniCPM4 model"):
        save_hf_checkpoint(model, cfg, tmp_path / "x", format="llama")
    with pytest.raises(ValueError, match="dtype: 'int8' is not supported"):
        save_hf_checkpoint(model, cfg, tmp_path / "x", dtype="int8")
    assert not (tmp_path / "x").exists()
