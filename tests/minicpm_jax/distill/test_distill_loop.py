"""The distillation loop: rollout rows and their alignment, scoring against full forwards, the engine
step (teacher = student gives zero gradient), 8 devices = 1 device, resume after SIGKILL, compatibility."""

import copy
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from minicpm_jax.ckpt import load_model, save_model
from minicpm_jax.config import MeshConfig, load_config
from minicpm_jax.distill import load_distill_recipe, run_distill
from minicpm_jax.distill.compat import check_compatible
from minicpm_jax.distill.pipeline import build_prompts
from minicpm_jax.distill.recipe import DistillRecipe
from minicpm_jax.distill.rollout import RolloutSource, final_number_reward, group_advantages
from minicpm_jax.eval.loading import byte_tokenizer
from minicpm_jax.generate.text import load_tokenizer
from minicpm_jax.model import create_model
from minicpm_jax.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[3]
TOKENIZER = ROOT / "tests" / "data" / "minicpm4-tokenizer"


def _model(seed, vocab=320):
    cfg = load_config("tiny-minicpm4", [f"model.vocab_size={vocab}"]).model
    return cfg, create_model(cfg, seed=seed, dtype=jnp.float32)


def _checkpoint(tmp_path, name, seed):
    cfg, model = _model(seed)
    return str(save_model(model, cfg, tmp_path / name, tokenizer_source="byte"))


def _recipe(tmp_path, student, teacher, **over):
    recipe = {
        "student": student,
        "teacher": teacher,
        "output_dir": str(tmp_path / "run"),
        "prompts": {"sets": [{"source": "synthetic", "dataset": "arithmetic", "num_prompts": 16, "seed": 1}]},
        "rollout": {"n": 2, "prompts_per_step": 4, "max_prompt_tokens": 16, "max_new_tokens": 16, "chunk_tokens": 64},
        "loss": {"loss": "student_topk", "k": 4},
        "optimizer": {"learning_rate": 0.003},
        "train": {"steps": 4, "log_every": 1, "checkpoint_every": 2, "keep_checkpoints": 3},
        **over,
    }
    path = tmp_path / "distill.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


class _Trainer:  # what RolloutSource reads from the engine's Trainer
    def __init__(self, student, teacher):
        from minicpm_jax.sharding import make_mesh
        from minicpm_jax.train.frozen import prepare_frozen

        self.mesh = make_mesh(MeshConfig(fsdp=1), devices=jax.devices()[:1])
        self.graphdef, params = nnx.split(student, nnx.Param)
        self.state = {"params": nnx.to_pure_dict(params)}
        self.frozen = prepare_frozen({"teacher": teacher}, self.mesh)

    def model(self):
        return nnx.merge(self.graphdef, self.state["params"])


def test_rollout_rows_align_and_scores_equal_full_forwards():
    _, student = _model(1)
    _, teacher = _model(2)
    tok = byte_tokenizer()
    prompts = build_prompts(DistillRecipe(student="s", teacher="t"), tok)[:8]
    source = RolloutSource(
        prompts, tokenizer=tok, n=2, prompts_per_step=4, max_prompt_tokens=16, max_new_tokens=12, k=5
    )
    trainer = _Trainer(student, teacher)
    batch = source.next_batch(1, trainer)
    rows, _ = source.rollout(1, student)
    np.testing.assert_array_equal(np.asarray(batch["input_ids"]), rows["input_ids"])  # deterministic by step
    ids, targets, mask = (np.asarray(batch[k]) for k in ("input_ids", "targets", "loss_mask"))
    for r, prompt in enumerate(p for p in source.prompts_of(1) for _ in range(2)):
        n_p, n_r = len(prompt.ids), int(mask[r].sum())
        assert list(ids[r, :n_p]) == list(prompt.ids) and mask[r, : n_p - 1].sum() == 0
        assert mask[r, n_p - 1 : n_p - 1 + n_r].all()  # logits at position i score the response token i + 1
    logq = np.asarray(jax.nn.log_softmax(teacher(jnp.asarray(ids)), axis=-1))
    logp = np.asarray(jax.nn.log_softmax(student(jnp.asarray(ids)), axis=-1))
    np.testing.assert_allclose(
        np.asarray(batch["tch_logp_tok"]), np.take_along_axis(logq, targets[..., None], -1)[..., 0], atol=1e-5
    )
    np.testing.assert_allclose(
        np.asarray(batch["stu_logp_tok"]), np.take_along_axis(logp, targets[..., None], -1)[..., 0], atol=1e-5
    )
    top = np.argsort(-logp, -1)[..., :5]
    np.testing.assert_array_equal(np.sort(np.asarray(batch["stu_topk_ids"]), -1), np.sort(top, -1))
    stu_ids, on_stu = np.asarray(batch["stu_topk_ids"]), np.asarray(batch["tch_logp_on_stu_ids"])
    hit = stu_ids == targets[..., None]  # the sampled token in the student top-k: same teacher log-prob
    np.testing.assert_allclose(
        on_stu[hit], np.broadcast_to(np.asarray(batch["tch_logp_tok"])[..., None], hit.shape)[hit], atol=1e-6
    )
    np.testing.assert_allclose(np.asarray(batch["tch_entropy"]), -(np.exp(logq) * logq).sum(-1), atol=1e-4)


def test_reward_and_group_advantages():
    assert final_number_reward(" 40+30=70, 7+8=15, 70+15=85", " 40+30=70, 7+8=15, 70+15=85") == 1.0
    assert final_number_reward(" 40+30=70, 7+8=15, 70+15=84", " 85") == 0.0 and final_number_reward("", "3") == 0.0
    adv = group_advantages(np.array([1.0, 0.0, 1.0, 1.0]), 2)
    np.testing.assert_allclose(adv, [1, -1, 0, 0], atol=1e-5)


def test_teacher_equal_to_student_gives_zero_gradient_and_full_overlap(tmp_path):
    path = _checkpoint(tmp_path, "same", 3)
    summary = run_distill(load_distill_recipe(_recipe(tmp_path, path, path, train={"steps": 2, "log_every": 1})))
    assert summary["steps"] == 2
    records = [r for r in read_metrics(tmp_path / "run") if "opd/overlap_ratio" in r]
    for r in records:
        assert r["grad_norm"] < 1e-6 and abs(r["loss"]) < 1e-6
        assert r["opd/overlap_ratio"] == pytest.approx(1.0) and r["opd/entropy_gap"] < 1e-5


def _final(out):
    return jax.tree.map(
        np.asarray, nnx.to_pure_dict(nnx.state(load_model(Path(out) / "final", dtype=jnp.float32)[1], nnx.Param))
    )


def _cli(recipe):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "minicpm_jax.cli", "distill", "--config", str(recipe)]
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_one_device_equals_eight_and_sigkill_resumes_bit_exactly(tmp_path):
    student, teacher = _checkpoint(tmp_path, "s", 1), _checkpoint(tmp_path, "t", 2)
    runs = {name: tmp_path / name for name in ("clean", "eight", "crash")}
    train = {"steps": 4, "checkpoint_every": 2, "log_every": 1}
    recipes = {name: _recipe(d, student, teacher, train=train) for name, d in runs.items() if not d.mkdir()}
    clean = _cli(recipes["clean"])  # one device, in the background while 8 devices run here
    eight = load_distill_recipe(recipes["eight"], ["mesh.data=2", "mesh.fsdp=2", "mesh.tensor=2"])
    run_distill(eight)
    assert clean.wait() == 0, clean.stderr.read()[-3000:]
    ref = _final(runs["clean"] / "run")
    jax.tree.map(
        lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5), ref, _final(runs["eight"] / "run")
    )
    la, lb = ([r["loss"] for r in read_metrics(runs[n] / "run") if "loss" in r] for n in ("clean", "eight"))
    np.testing.assert_allclose(la, lb, rtol=1e-4, atol=1e-6)
    proc = _cli(recipes["crash"])
    checkpoints, deadline = runs["crash"] / "run" / "checkpoints", time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if checkpoints.is_dir() and any(p.name.isdigit() and int(p.name) >= 2 for p in checkpoints.iterdir()):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (runs["crash"] / "run" / "final").exists()
    assert _cli(recipes["crash"]).wait() == 0
    jax.tree.map(np.testing.assert_array_equal, ref, _final(runs["crash"] / "run"))


def test_compatibility_errors():
    tok = load_tokenizer(TOKENIZER)
    cfg = load_config("tiny-minicpm4", ["model.vocab_size=73448"]).model
    check_compatible(cfg, cfg, tok, load_tokenizer(TOKENIZER))  # identical: fine
    with pytest.raises(ValueError, match="vocab_size: student 73448 vs teacher 73472"):
        check_compatible(cfg, cfg.model_copy(update={"vocab_size": 73472}), tok, tok)
    other = copy.copy(tok)
    other.stop_ids = [2]
    with pytest.raises(ValueError, match="EOS set"):
        check_compatible(cfg, cfg, tok, other)
    other = copy.copy(tok)
    other.chat_template = "{{ messages[0]['content'] }}"
    with pytest.raises(ValueError, match="chat template"):
        check_compatible(cfg, cfg, tok, other)
    with pytest.raises(ValueError, match="tokenizer vocabulary"):
        check_compatible(cfg, cfg, tok, byte_tokenizer())


def test_teacher_on_its_own_devices_is_refused_with_several_processes(tmp_path, monkeypatch):
    recipe = load_distill_recipe(_recipe(tmp_path, "student", "teacher", teacher_devices=4))
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    with pytest.raises(ValueError, match="teacher_devices=4: a teacher on its own devices needs one process"):
        run_distill(recipe)
