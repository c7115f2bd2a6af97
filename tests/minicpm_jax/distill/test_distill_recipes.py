"""Distillation recipes: teacher-aligned prompts (template, provenance mixing), the cold start's
rejection filters and its teacher-rollouts -> SFT -> OPD run, and recipe errors."""

import json

import jax.numpy as jnp
import pytest
import yaml

from minicpm_jax.ckpt import is_native_checkpoint, save_model
from minicpm_jax.config import load_config
from minicpm_jax.config.loading import ConfigError
from minicpm_jax.distill import load_distill_recipe, run_distill
from minicpm_jax.distill.cold_start import SFTSource, degenerate
from minicpm_jax.distill.pipeline import build_prompts, mix
from minicpm_jax.eval.loading import byte_tokenizer
from minicpm_jax.model import create_model
from minicpm_jax.train.metrics import read_metrics


def _write(tmp_path, **recipe):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"student": "tiny-minicpm4", "teacher": "tiny-minicpm4", **recipe}))
    return path


def test_prompt_template_and_ood_mixing(tmp_path):
    (tmp_path / "ood.jsonl").write_text("\n".join(json.dumps({"prompt": f"ood {i}"}) for i in range(3)) + "\n")
    sets = [
        {"source": "synthetic", "dataset": "arithmetic", "num_prompts": 6, "provenance": "teacher"},
        {"source": "jsonl", "path": "ood.jsonl", "provenance": "ood"},
    ]
    recipe = load_distill_recipe(
        _write(tmp_path, prompts={"sets": sets, "ood_ratio": 0.25, "template": "Q: {prompt} A:"})
    )
    tok = byte_tokenizer()
    texts = [tok.decode(p.ids) for p in build_prompts(recipe, tok)]
    assert len(texts) == 8 and sum(t.startswith("Q: ood") for t in texts) == 2  # 6 / (1 - 0.25) = 8, a quarter OOD
    assert all(t.startswith("Q: ") and t.endswith(" A:") for t in texts)
    assert mix(list("abc"), ["x"], 0.5) == ["a", "x", "b", "x", "c", "x"]
    with pytest.raises(ConfigError, match="no {prompt} placeholder"):
        load_distill_recipe(_write(tmp_path, prompts={"template": "Q:"}))
    with pytest.raises(ConfigError, match="prompt sets of both provenances"):
        load_distill_recipe(_write(tmp_path, prompts={"ood_ratio": 0.3}))
    with pytest.raises(ValueError, match="must not be used: a per-position top-k KL value"):
        load_distill_recipe(_write(tmp_path, loss={"loss": "topk_kl_advantage"}))


def test_cold_start_filters():
    assert not degenerate(" 40+30=70, 7+8=15, 70+15=85")
    assert degenerate("\n".join(["the same line again and again"] * 5))
    assert not degenerate("\n".join(["the same line again and again"] * 4))
    assert degenerate("0123456789" * 30)  # the same 100-character window at offsets 0, 10, ..., 200
    assert not degenerate("".join(chr(65 + (i * 7919) % 58) for i in range(300)))  # no repeated window
    rows = SFTSource([((1, 5, 6), [7, 8, 2])], rows=2, width=6, pad_id=0).next_batch(1, None)
    assert rows["input_ids"][0].tolist() == [1, 5, 6, 7, 8, 2] and rows["targets"][0].tolist() == [5, 6, 7, 8, 2, 0]
    assert rows["loss_mask"][0].tolist() == [0, 0, 1, 1, 1, 0]  # the response tokens 7 8 2 only


def test_cold_start_then_distillation(tmp_path, monkeypatch):
    from minicpm_jax.distill import cold_start

    real = cold_start.generate

    def stopping_teacher(model, prompts, **kw):  # a random teacher rarely emits eos: make even rows stop
        out = real(model, prompts, **kw)
        out.tokens, out.lengths = out.tokens.copy(), out.lengths.copy()
        for i in range(0, len(prompts), 2):
            out.tokens[i, 4], out.lengths[i], out.finish_reasons[i] = 2, 5, "stop"
        return out

    monkeypatch.setattr(cold_start, "generate", stopping_teacher)
    cfg = load_config("tiny-minicpm4", ["model.vocab_size=320"]).model
    paths = {}
    for name, seed in (("student", 1), ("teacher", 2)):
        paths[name] = str(
            save_model(create_model(cfg, seed=seed, dtype=jnp.float32), cfg, tmp_path / name, tokenizer_source="byte")
        )
    recipe = _write(
        tmp_path,
        **paths,
        output_dir=str(tmp_path / "run"),
        mesh={"data": 1, "fsdp": 4, "tensor": 2},
        prompts={"sets": [{"num_prompts": 24}]},
        cold_start={
            "enabled": True,
            "num_prompts": 8,
            "max_new_tokens": 8,
            "max_attempts": 1,
            "temperature": 1.0,
            "top_p": 1.0,
            "steps": 2,
            "batch_size": 4,
        },
        rollout={"n": 2, "prompts_per_step": 2, "max_prompt_tokens": 16, "max_new_tokens": 8, "chunk_tokens": 64},
        loss={"loss": "sampled", "k": 0},
        train={"steps": 2, "log_every": 1},
    )
    summary = run_distill(load_distill_recipe(recipe))
    assert summary["steps"] == 2 and is_native_checkpoint(tmp_path / "run" / "cold-start" / "final")
    rollouts = (tmp_path / "run" / "cold-start" / "teacher_rollouts.jsonl").read_text().splitlines()
    assert len(rollouts) == 4  # the stopped half; the others are rejected as incomplete
    assert all(json.loads(r)["response_ids"][-1] == 2 for r in rollouts)
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "cold-start") if "loss" in r] == [1, 2]
    assert any("opd/overlap_ratio" in r for r in read_metrics(tmp_path / "run"))


def _pair(tmp_path):
    cfg = load_config("tiny-minicpm4", ["model.vocab_size=320"]).model
    return {
        name: str(
            save_model(create_model(cfg, seed=seed, dtype=jnp.float32), cfg, tmp_path / name, tokenizer_source="byte")
        )
        for name, seed in (("student", 1), ("teacher", 2))
    }


def test_teacher_on_its_own_devices_equals_the_shared_mesh(tmp_path):
    import jax
    import numpy as np
    from flax import nnx

    from minicpm_jax.ckpt import load_model

    paths, finals, losses = _pair(tmp_path), {}, {}
    common = {
        "prompts": {"sets": [{"num_prompts": 8}]},
        "rollout": {"n": 2, "prompts_per_step": 2, "max_prompt_tokens": 16, "max_new_tokens": 8, "chunk_tokens": 64},
        "loss": {"loss": "student_topk", "k": 4},
        "train": {"steps": 2, "log_every": 1},
    }
    for name, extra in (
        ("same_mesh", {"mesh": {"data": 1, "fsdp": 4, "tensor": 2}}),
        ("split", {"teacher_devices": 4, "mesh": {"data": 1, "fsdp": 4, "tensor": 1}}),
    ):
        d = tmp_path / name
        d.mkdir()
        run_distill(load_distill_recipe(_write(d, **paths, output_dir=str(d / "run"), **common, **extra)))
        model = load_model(d / "run" / "final", dtype=jnp.float32)[1]
        finals[name] = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        losses[name] = [r["loss"] for r in read_metrics(d / "run") if "loss" in r]
    np.testing.assert_allclose(losses["split"], losses["same_mesh"], rtol=1e-4, atol=1e-6)
    # different meshes reduce in different orders; Adam normalises the tiny differences: atol 1e-4
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4), finals["split"], finals["same_mesh"]
    )


def test_gkd_mixing_samples_some_steps_from_the_teacher(tmp_path):
    paths = _pair(tmp_path)
    recipe = _write(
        tmp_path,
        **paths,
        output_dir=str(tmp_path / "run"),
        mesh={"data": 1, "fsdp": 4, "tensor": 2},
        prompts={"sets": [{"num_prompts": 8}]},
        rollout={
            "n": 2,
            "prompts_per_step": 2,
            "max_prompt_tokens": 16,
            "max_new_tokens": 8,
            "chunk_tokens": 64,
            "lmbda": 0.5,
        },
        loss={"loss": "gkd_jsd", "k": 4, "beta": 0.5},
        train={"steps": 6, "log_every": 1},
    )
    run_distill(load_distill_recipe(recipe))
    on_policy = [r["rollout/on_policy"] for r in read_metrics(tmp_path / "run") if "rollout/on_policy" in r]
    assert len(on_policy) == 6 and set(on_policy) == {0.0, 1.0}, on_policy  # both kinds of steps, seeded
    with pytest.raises(ConfigError, match="on-policy policy-gradient estimator"):
        load_distill_recipe(recipe, ["loss.loss=student_topk"])
    with pytest.raises(ConfigError, match="serves only the top-k losses"):
        load_distill_recipe(recipe, ["teacher_devices=2", "rollout.lmbda=1.0"])
