"""Presets, overrides, official config.json loading, and the one-error-for-everything rule."""

import json
from types import SimpleNamespace
from pathlib import Path

import pytest

from minicpm_jax.config import (
    ConfigError,
    ModelConfig,
    build_config,
    load_config,
    load_recipe,
    model_config_from_hf,
    model_config_to_hf,
    preset_names,
)

DATA = Path(__file__).resolve().parents[1] / "data"  # fixtures copied from shared/data (tests/data/README.md)
RECIPES = Path(__file__).resolve().parents[2] / "configs" / "recipes"


def _official(name):
    path = DATA / name
    if not path.is_file():
        pytest.fail(f"reference file {path} is missing (tests/data is part of the repository)")
    return json.loads(path.read_text())


def test_presets_all_validate():
    names = preset_names()
    for required in ("minicpm4-0.5b", "minicpm4-8b", "minicpm4.1-8b", "minicpm-sala-9b", "tiny-minicpm4"):
        assert required in names
    for name in names:
        assert isinstance(load_config(name).model, ModelConfig)


def test_official_config_json_equals_preset():
    assert model_config_from_hf(_official("minicpm4-0.5b.config.json")) == load_config("minicpm4-0.5b").model
    assert model_config_from_hf(_official("minicpm-sala-9b.config.json")) == load_config("minicpm-sala-9b").model


def test_preset_05b_values_from_spec():
    cfg = load_config("minicpm4-0.5b").model
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        24,
        1024,
        16,
        2,
    )
    assert cfg.tie_word_embeddings and cfg.vocab_size == 73448 and cfg.rms_norm_eps == 1e-5
    assert cfg.residual_scale == pytest.approx(0.285774, abs=1e-6) and cfg.logit_divisor == 4
    sala = load_config("minicpm-sala-9b").model
    assert [i for i, m in enumerate(sala.layer_mixers) if m == "minicpm4"] == [0, 9, 16, 17, 22, 29, 30, 31]


@pytest.mark.parametrize("name", ["minicpm4-0.5b", "minicpm4-8b", "minicpm-sala-9b", "tiny-minicpm4-longrope"])
def test_hf_config_round_trip(name):
    cfg = load_config(name).model
    assert model_config_from_hf(json.loads(json.dumps(model_config_to_hf(cfg)))) == cfg


def test_dotted_overrides():
    cfg = load_config(
        "minicpm4-0.5b", ["model.num_hidden_layers=4", "dtype=float32", "mesh.tensor=2", "model.sparse_config.topk=8"]
    )
    assert cfg.model.num_hidden_layers == 4 and cfg.dtype == "float32" and cfg.mesh.tensor == 2
    assert cfg.model.sparse_config.topk == 8 and cfg.model.sparse_config.block_size == 64


def test_every_problem_reported_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(
            "tiny-minicpm4",
            [
                "model.hidden_sizee=64",  # unknown key
                "model.num_hidden_layers=two",  # wrong type
                "model.num_attention_heads=5",  # does not divide hidden size 64
                "model.num_key_value_heads=3",  # does not divide heads
                "model.mixer_types=[minicpm4, mamba, minicpm4]",  # wrong length + unknown mixer
                "mesh.tensr=2",  # unknown key in another section
            ],
        )
    text = str(info.value)
    for needle in (
        "model.hidden_sizee: unknown key; allowed keys:",
        "hidden_size",
        "model.num_hidden_layers:",
        "'two'",
        "model.num_attention_heads: 5 does not divide model.hidden_size 64",
        "model.num_key_value_heads: 3 must be a positive divisor of num_attention_heads 5",
        "model.mixer_types: unknown mixer type(s) ['mamba']; allowed: ['minicpm4', 'lightning-attn']",
        "mesh.tensr: unknown key; allowed keys: data, dcn, fsdp, sequence, tensor",
    ):
        assert needle in text, (needle, text)
    assert "model.rope_scaling.long_factor: has 8 values, head_dim/2 is 6" in text  # 64 // 5 = 12
    assert "has 3 entries" not in text  # the length rule needs a valid num_hidden_layers
    assert len(info.value.errors) == 8


def test_mixer_length_mismatch():
    with pytest.raises(ConfigError, match=r"model.mixer_types: has 3 entries, num_hidden_layers is 2"):
        build_config({"model": {**load_config("tiny-minicpm4").model.model_dump(), "mixer_types": ["minicpm4"] * 3}})


def test_unknown_preset_and_bad_override():
    with pytest.raises(ConfigError, match="no preset or file 'nope'"):
        load_config("nope")
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        load_config("tiny-minicpm4", ["model.num_hidden_layers"])
    with pytest.raises(ConfigError, match=r"override 'model.hidden_size=\[': the value is not valid YAML \(expected"):
        load_config("tiny-minicpm4", ["model.hidden_size=["])


def test_recipe_by_shipped_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # names resolve to the shipped recipes wherever the command runs
    assert load_recipe("pretrain-tiny") == load_recipe(RECIPES / "pretrain-tiny.yaml")
    with pytest.raises(ConfigError, match=r"recipe: no file .*nope.yaml'; shipped recipes: \[.*'pretrain-tiny'"):
        load_recipe("nope")


def test_unsupported_model_type():
    with pytest.raises(ConfigError, match=r"model_type: 'qwen2' is not supported"):
        model_config_from_hf({"model_type": "qwen2", "hidden_size": 64})


@pytest.mark.parametrize(
    "name,official",
    [("minicpm4-0.5b", "minicpm4-0.5b.config.json"), ("minicpm-sala-9b", "minicpm-sala-9b.config.json")],
)
def test_exported_config_json_has_official_fields(name, official):
    ours = model_config_to_hf(load_config(name).model)
    theirs = _official(official)
    skip = {"_name_or_path", "transformers_version", "auto_map", "dtype", "torch_dtype"}
    assert {k: v for k, v in theirs.items() if k not in skip} == {k: ours[k] for k in theirs if k not in skip}
    assert ours["architectures"] == theirs["architectures"]
    assert {k: v.split("--")[1] for k, v in ours["auto_map"].items()} == theirs["auto_map"]


def _recipe(tmp_path, text):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("spelling", ["model.preset", "model"])
def test_cli_preset_replaces_recipe_preset(spelling):
    cfg = load_recipe(RECIPES / "pretrain-tiny.yaml", [f"{spelling}=tiny-sala"])
    sala = load_config("tiny-sala").model
    assert cfg.model == sala.model_copy(update={"vocab_size": 320})  # the recipe's own field still applies
    assert cfg.train == load_recipe(RECIPES / "pretrain-tiny.yaml").train
    sala_yaml = RECIPES.parent / "models" / "tiny-sala.yaml"
    by_path = load_recipe(RECIPES / "pretrain-tiny.yaml", [f"{spelling}={sala_yaml}"])
    assert by_path == cfg


def test_model_precedence_file_preset_cli_preset_file_fields_cli_fields(tmp_path):
    path = _recipe(
        tmp_path,
        "model: {preset: tiny-minicpm4, vocab_size: 320, initializer_range: 0.05}\ntrain: {steps: 7}\n",
    )
    # CLI fields win wherever they stand relative to the CLI preset
    cfg = load_recipe(path, ["model.vocab_size=384", "model=tiny-sala", "train.steps=9"])
    m, sala = cfg.model, load_config("tiny-sala").model
    assert m.vocab_size == 384  # CLI field > file field
    assert m.initializer_range == 0.05  # file field > CLI preset
    assert m.model_type == "minicpm_sala" and m.mixer_types == sala.mixer_types  # CLI preset > file preset
    assert m.rope_scaling is None and m.num_hidden_layers == 8  # the file preset is replaced, not merged
    assert cfg.train.steps == 9
    # the last of several CLI presets is used; without one the file preset stands
    assert load_recipe(path, ["model=tiny-sala", "model.preset=tiny-minicpm4-sparse"]).model.sparse_config.topk == 4
    assert load_recipe(path, ["model=tiny-sala", "model.preset=tiny-minicpm4-sparse"]).model.model_type == "minicpm"
    plain = load_recipe(path).model
    assert plain == load_config("tiny-minicpm4").model.model_copy(update={"vocab_size": 320, "initializer_range": 0.05})
    # a recipe whose model is a bare preset name
    bare = _recipe(tmp_path, "model: tiny-minicpm4\n")
    assert load_recipe(bare, ["model.preset=tiny-sala"]).model == load_config("tiny-sala").model


@pytest.mark.parametrize("spelling", ["model.preset", "model"])
def test_cli_preset_unknown_name_lists_presets(spelling):
    with pytest.raises(ConfigError, match=r"model: no preset or file 'nope'; presets: \[.*'tiny-sala'") as info:
        load_recipe(RECIPES / "pretrain-tiny.yaml", [f"{spelling}=nope"])
    assert len(info.value.errors) == 1
    with pytest.raises(ConfigError, match=rf"{spelling}: expected a preset name .* or a YAML file path"):
        load_recipe(RECIPES / "pretrain-tiny.yaml", [f"{spelling}=[1, 2]"])


# training recipes (eval-*, convert-*, distill-* are recipes of those commands, loaded by
# tests/minicpm_jax/eval/test_eval_cli.py and tests/minicpm_jax/test_recipes.py)
TRAIN_RECIPES = sorted(RECIPES.glob("pretrain-*.yaml"))


@pytest.mark.parametrize("path", TRAIN_RECIPES, ids=lambda p: p.stem)
def test_every_recipe_loads_and_fits_8_devices(path):
    """Each shipped recipe validates, its mesh fits the model's parameters and the batch on 8 devices,
    and its rows fit the model's context (and, byte-level, its vocabulary)."""
    from minicpm_jax.data.tokenizer import check_vocab, load_tokenizer
    from minicpm_jax.info import model_info
    from minicpm_jax.sharding import mesh_shape
    from minicpm_jax.train.step import check_batch

    cfg = load_recipe(path)
    model_info(cfg, 8)  # raises when a parameter does not divide its mesh axes
    mesh = SimpleNamespace(shape=mesh_shape(cfg.mesh, 8))
    check_batch(mesh, cfg.train.global_batch_size, cfg.train.micro_batches, cfg.data.seq_len)
    assert cfg.data.seq_len <= cfg.model.max_position_embeddings
    assert cfg.train.output_dir.startswith("runs/")
    if cfg.data.tokenizer is None:
        check_vocab(load_tokenizer(None), cfg.model.vocab_size)


def test_tiny_recipes_differ_only_in_preset_and_output_dir():
    tiny = load_recipe(RECIPES / "pretrain-tiny.yaml")
    for name, preset in (("pretrain-tiny-sala", "tiny-sala"), ("pretrain-tiny-sparse", "tiny-minicpm4-sparse")):
        cfg = load_recipe(RECIPES / f"{name}.yaml")
        assert cfg.model == load_config(preset).model.model_copy(update={"vocab_size": 320})
        assert cfg.train == tiny.train.model_copy(update={"output_dir": f"runs/{name}"})
        assert (cfg.data, cfg.mesh, cfg.optimizer, cfg.dtype) == (tiny.data, tiny.mesh, tiny.optimizer, tiny.dtype)


@pytest.mark.parametrize(
    "override",
    [
        "train.checkpoint_every=0",
        "train.log_every=0",
        "train.loss_chunk_size=0",
        "train.keep_checkpoints=0",
        "train.steps=-1",
        "data.seq_len=0",
        "optimizer.learning_rate=-0.01",
        "model.num_hidden_layers=0",
        "model.intermediate_size=-4",
    ],
)
def test_non_positive_sizes_and_intervals_name_the_key(override):
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match="greater than 0") as info:
        load_recipe(RECIPES / "pretrain-tiny.yaml", [override])
    assert any(line.startswith(key) and "greater than 0" in line for line in info.value.errors), info.value.errors
