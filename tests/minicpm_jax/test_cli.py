"""The ``minicpm-jax`` commands, run in-process through ``cli.main``."""

import json

import pytest

from minicpm_jax import cli
from minicpm_jax.ckpt import load_model


def run(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


@pytest.mark.parametrize(
    "preset,expected",
    [
        ("minicpm4-0.5b", "433.9M parameters (433,873,920)"),
        ("minicpm4-8b", "8.19B parameters (8,185,253,888)"),
        ("minicpm-sala-9b", "9.48B parameters (9,477,203,968)"),
    ],
)
def test_info_counts(capsys, preset, expected):
    code, out = run(capsys, "info", preset, "mesh.fsdp=8", "--devices", "8")
    assert code == 0 and expected in out


def test_info_per_device_bytes(capsys):
    code, out = run(capsys, "info", "minicpm4-0.5b", "mesh.fsdp=4", "mesh.tensor=2", "--devices", "8")
    assert code == 0
    # embedding split 8 ways (vocab x tensor, embed x fsdp); q/o/MLP 8 ways; k/v 4 ways (KV heads are
    # replicated over tensor); norms replicated
    layer = 1024 * 1024 * 2 // 8 + 2 * 1024 * 128 // 4 + 3 * 1024 * 4096 // 8 + 2 * 1024
    per_device = 73448 * 1024 // 8 + 24 * layer + 1024
    assert per_device == 55_064_576
    assert "55.1M" in out and f"{per_device * 4 / 2**20:.1f} MiB" in out and f"{per_device * 8 / 2**20:.1f} MiB" in out


def test_info_errors(capsys):
    code, out = run(capsys, "info", "minicpm4-0.5b", "mesh.tensor=32", "--devices", "32")
    assert code == 2 and "q_proj.kernel: dimension 1 (heads=16) is not divisible by mesh axis tensor of size 32" in out
    code, out = run(capsys, "info", "minicpm4-0.5b", "model.hidden_sise=3")
    assert code == 2 and "model.hidden_sise: unknown key" in out


def test_train_plan_on_tiny_model(capsys):
    code, out = run(
        capsys,
        "info",
        "tiny-minicpm4",
        "--train-plan",
        "--plan-meshes",
        "fsdp=8;fsdp=2,tensor=4",
        "--plan-batch-sizes",
        "8",
        "--plan-seq-len",
        "64",
    )
    assert code == 0 and "tensor=4" in out and "8 x 64" in out and "compile s" in out


@pytest.mark.parametrize(
    "overrides,expected",
    [
        (["data.seq_len=4096"], "max_position_embeddings"),
        (["mesh.fsdp=8", "train.global_batch_size=12"], "not divisible by the data axes"),
    ],
)
def test_train_command_errors(capsys, tmp_path, overrides, expected):
    recipe = "configs/recipes/pretrain-tiny.yaml"
    code, out = run(capsys, "train", "--config", recipe, f"train.output_dir={tmp_path}", *overrides)
    assert code == 2 and expected in out


def test_export_import_commands(capsys, tmp_path):
    code, out = run(capsys, "export-hf", "tiny-minicpm4", str(tmp_path / "hf"), "--dtype", "float32", "seed=3")
    assert code == 0 and "model.safetensors" in out
    code, out = run(capsys, "import-hf", str(tmp_path / "hf"), str(tmp_path / "native"), "mesh.fsdp=2", "mesh.data=4")
    assert code == 0 and "imported" in out
    cfg, _ = load_model(tmp_path / "native")
    assert cfg.num_hidden_layers == 2
    code, out = run(capsys, "export-hf", str(tmp_path / "native"), str(tmp_path / "llama"), "--format", "llama")
    assert code == 0
    assert json.loads((tmp_path / "llama" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    code, out = run(capsys, "import-hf", str(tmp_path / "hf"), str(tmp_path / "x"), "model.vocab_size=3")
    assert code == 2 and "takes the model from its checkpoint" in out


def test_outputs_never_replace_other_files(capsys, tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("{}\n")
    assert run(capsys, "export-hf", "tiny-minicpm4", str(tmp_path / "hf"))[0] == 0
    for command in (["export-hf", "tiny-minicpm4", str(run_dir)], ["import-hf", str(tmp_path / "hf"), str(run_dir)]):
        code, out = run(capsys, *command)
        assert code == 2 and "give --overwrite" in out, out
        code, out = run(capsys, *command, "--overwrite")
        assert code == 2 and "contains a training run" in out and "nothing written" in out, out
        assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "metrics.jsonl"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    code, out = run(capsys, "export-hf", "tiny-minicpm4", str(tmp_path / "other"), "--overwrite")
    assert code == 2 and "not an earlier output of this kind" in out and (tmp_path / "other" / "notes.txt").is_file()
    code, _ = run(capsys, "export-hf", "tiny-minicpm4", str(tmp_path / "hf"), "seed=4")
    assert code == 2
    code, _ = run(capsys, "export-hf", "tiny-minicpm4", str(tmp_path / "hf"), "seed=4", "--overwrite")
    assert code == 0 and sorted(p.name for p in (tmp_path / "hf").iterdir() if p.suffix == ".safetensors")


@pytest.mark.torch
def test_demo_runs_end_to_end(tmp_path, capsys):
    pytest.importorskip("torch")
    code, out = run(
        capsys,
        "demo",
        "--output",
        str(tmp_path),
        "train.steps=30",
        "optimizer.decay_steps=10",
        "train.global_batch_size=8",
        "data.seq_len=64",
    )
    assert code == 0 and "[6/6] generated from hf-minicpm" in out and "PyTorch" in out and "pretrained: loss" in out
    assert (tmp_path / "hf-llama" / "model.safetensors").is_file()
