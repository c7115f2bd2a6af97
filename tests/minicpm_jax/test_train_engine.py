"""Engine v2: trainable subsets, frozen (teacher) state, aux metrics, and the batch-sharded loss."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from train_testutil import one_device, random_batch, tiny_cfg

from minicpm_jax.config import MeshConfig
from minicpm_jax.model.factory import create_model
from minicpm_jax.sharding import make_mesh
from minicpm_jax.train import trainable as tr
from minicpm_jax.train.loss import next_token_loss
from minicpm_jax.train.state import create_trainer
from minicpm_jax.train.step import leaf_batch_sharding


def _cfg(*overrides):
    return tiny_cfg("optimizer.schedule=constant", *overrides)


LOSS = functools.partial(next_token_loss, chunk_size=1024)


def test_trainable_patterns_select_by_dotted_prefix():
    params = {"model": {"layers": {0: {"self_attn": {"q": 1}, "mlp": {"w": 2}}, 1: {"self_attn": {"q": 3}}}}}
    mask = tr.trainable_mask(params, ["model.layers.*.self_attn"])
    assert mask == {
        "model": {"layers": {0: {"self_attn": {"q": True}, "mlp": {"w": False}}, 1: {"self_attn": {"q": True}}}}
    }
    train, fixed = tr.split(params, mask)
    assert fixed == {"model": {"layers": {0: {"mlp": {"w": 2}}}}}
    assert tr.merge(train, fixed) == params
    assert tr.trainable_mask(params, lambda p: p.endswith("w")) == jax.tree.map(lambda x: x == 2, params)
    with pytest.raises(ValueError, match=r"pattern\(s\) \['model.nope'\] match no parameter"):
        tr.trainable_mask(params, ["model.nope"])


def test_frozen_parameters_bit_identical_and_without_moments():
    cfg = _cfg("train.trainable=[model.layers.*.self_attn]")
    trainer = create_trainer(cfg, one_device(), LOSS)
    before = jax.tree.map(np.asarray, trainer.state["params"])
    for seed in range(3):
        metrics = trainer.step(random_batch(seed=seed))
    assert bool(metrics["finite"])
    after = jax.tree.map(np.asarray, trainer.state["params"])
    train_before, fixed_before = tr.split(before, trainer.mask)
    train_after, fixed_after = tr.split(after, trainer.mask)
    for a, b in zip(jax.tree.leaves(fixed_before), jax.tree.leaves(fixed_after)):
        np.testing.assert_array_equal(a, b)
    assert all(np.abs(a - b).max() > 0 for a, b in zip(jax.tree.leaves(train_before), jax.tree.leaves(train_after)))
    # AdamW keeps mu and nu for the 2 layers x 4 attention matrices only
    n_train, bytes_train = tr.count(train_before)
    assert n_train == 8
    moments = [x for x in jax.tree.leaves(trainer.state["opt_state"]) if x.ndim > 0]
    assert len(moments) == 2 * n_train and sum(x.nbytes for x in moments) == 2 * bytes_train
    full = create_trainer(_cfg(), one_device(), LOSS)
    n_all = len(jax.tree.leaves(full.state["params"]))
    assert len([x for x in jax.tree.leaves(full.state["opt_state"]) if x.ndim > 0]) == 2 * n_all > 2 * n_train


def _aux_loss(model, frozen, batch):
    """Next-token loss plus a token-summed aux and a per-row mean as a (numerator, denominator) pair."""
    loss_sum, (weight, _) = LOSS(model, frozen, batch)
    rows_with_tokens = jnp.sum(batch["loss_mask"].sum(-1) > 0)
    first = batch["input_ids"][:, 0].astype(jnp.float32)
    return loss_sum, (
        weight,
        {
            "loss_copy": loss_sum,
            "first_id": (jnp.sum(first), first.shape[0] * 1.0),
            "rows_with_tokens": (rows_with_tokens, first.shape[0] * 1.0),
        },
    )


def test_aux_metrics_weighted_across_micro_batches():
    batch = random_batch()
    out = {}
    for micro in (1, 4):
        trainer = create_trainer(_cfg(f"train.micro_batches={micro}"), one_device(), _aux_loss)
        out[micro] = jax.device_get(trainer.step(batch))
    one, four = out[1], out[4]
    np.testing.assert_allclose(four["aux"]["loss_copy"], one["loss"], rtol=1e-6)
    np.testing.assert_allclose(four["aux"]["loss_copy"], four["loss"], rtol=1e-6)
    np.testing.assert_allclose(four["aux"]["first_id"], batch["input_ids"][:, 0].mean(), rtol=1e-6)
    assert four["aux"]["rows_with_tokens"] == one["aux"]["rows_with_tokens"] == 7 / 8  # row 1 has no tokens
    # eval accumulates the same way
    s, w, parts = trainer.evaluate_batch(batch)
    np.testing.assert_allclose(parts["loss_copy"][0] / parts["loss_copy"][1], s / w, rtol=1e-6)


def _kl_to_teacher(model, frozen, batch):
    """Token-summed KL(teacher || student) over the full vocabulary (toy sizes)."""
    student = jax.nn.log_softmax(model(batch["input_ids"]), -1)
    teacher = jax.lax.stop_gradient(jax.nn.log_softmax(frozen["teacher"](batch["input_ids"]), -1))
    kl = jnp.sum(jnp.exp(teacher) * (teacher - student), -1) * batch["loss_mask"]
    return kl.sum(), (batch["loss_mask"].sum(), {"kl": kl.sum()})


def test_kl_to_sharded_frozen_teacher_trains():
    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
    cfg = _cfg("optimizer.learning_rate=0.02")
    teacher = create_model(cfg.model, mesh=mesh, seed=1, dtype=jnp.float32)
    trainer = create_trainer(cfg, mesh, _kl_to_teacher, frozen={"teacher": teacher})
    kernel = trainer.frozen.arrays["teacher"]["model"]["layers"][0]["mlp"]["up_proj"]["kernel"]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    batch = {k: jax.device_put(v, leaf_batch_sharding(mesh, v)) for k, v in random_batch().items()}
    kls = [float(trainer.step(batch)["aux"]["kl"]) for _ in range(8)]
    assert kls[-1] < 0.5 * kls[0], kls
    # the teacher is an argument of the compiled step, not a constant folded into it
    compiled = trainer.train_step.lower(trainer.state, trainer.frozen.arrays, batch).compile()
    frozen_in = compiled.input_shardings[0][1]["teacher"]["model"]["layers"][0]["mlp"]["up_proj"]["kernel"]
    assert frozen_in.is_equivalent_to(kernel.sharding, 2)
    teacher_after = trainer.frozen.value()["teacher"]
    np.testing.assert_array_equal(np.asarray(teacher_after.model.layers[0].mlp.up_proj.kernel[...]), np.asarray(kernel))


def test_lm_head_flops_split_over_data_shards():
    """On 8 data shards each device computes ~1/8 of the step (the LM head included), not a gathered loss.

    XLA counts a loop body once, so both meshes are compared per scanned loss chunk (4 chunks of
    128 tokens here). The earlier loss, which chunked the flattened ``[B*T]`` tokens, measured 0.18.
    """
    cfg = _cfg("model.vocab_size=4096")  # a large head: replicating it would dominate the step
    batch = random_batch(rows=16, seq=32, vocab=4096)
    flops = {}
    for name, mesh in (("one", one_device()), ("eight", make_mesh(MeshConfig(fsdp=8)))):
        trainer = create_trainer(cfg, mesh, functools.partial(next_token_loss, chunk_size=128))
        placed = {k: jax.device_put(v, leaf_batch_sharding(mesh, v)) for k, v in batch.items()}
        compiled = trainer.train_step.lower(trainer.state, trainer.frozen.arrays, placed).compile()
        flops[name] = compiled.cost_analysis()["flops"]
    assert flops["eight"] < 0.15 * flops["one"], flops  # ideal 1/8 = 0.125


def test_info_counts_optimizer_memory_of_the_trainable_subset_only():
    from minicpm_jax.info import model_info

    cfg = _cfg("train.trainable=[model.layers.*.self_attn]")
    info, full = model_info(cfg, 1), model_info(_cfg(), 1)
    trainer = create_trainer(cfg, one_device(), LOSS)
    _, train_bytes = tr.count(tr.split(trainer.state["params"], trainer.mask)[0])
    moments = [x for x in jax.tree.leaves(trainer.state["opt_state"]) if x.ndim > 0]  # without step counters
    assert info.optimizer_bytes == 2 * train_bytes == sum(x.nbytes for x in moments)
    assert info.param_bytes == full.param_bytes and info.grad_bytes == train_bytes < full.grad_bytes


def test_frozen_teacher_from_config_is_reloaded_on_resume_and_not_checkpointed(tmp_path):
    """``train.frozen.teacher=DIR``: a KL-to-teacher run resumes (the teacher reloaded from DIR), the
    checkpoint holds only the student, and the KL aux metric is logged."""
    import os

    from minicpm_jax.ckpt import save_model
    from minicpm_jax.config import load_recipe
    from minicpm_jax.train.loop import run_training
    from minicpm_jax.train.metrics import read_metrics

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    recipe = os.path.join(root, "configs/recipes/pretrain-tiny.yaml")
    student_cfg = load_recipe(recipe, []).model
    save_model(create_model(student_cfg, seed=7, dtype=jnp.float32), student_cfg, tmp_path / "teacher")

    def cfg(steps):
        return load_recipe(
            recipe,
            [
                f"train.output_dir={tmp_path / 'run'}",
                f"train.frozen.teacher={tmp_path / 'teacher'}",
                f"train.steps={steps}",
                "train.checkpoint_every=2",
                "train.log_every=1",
                "train.global_batch_size=8",
                "data.seq_len=32",
                "data.synthetic_documents=200",
                "data.eval_documents=8",
                "optimizer.warmup_steps=0",
                "optimizer.decay_steps=0",
            ],
        )

    seen = []

    def kl_loss(model, frozen, batch):
        seen.append(frozen["teacher"].model.norm.weight[...].dtype)
        return _kl_to_teacher(model, frozen, batch)

    run_training(cfg(2).model_copy(update={"dtype": "bfloat16"}), loss_fn=kl_loss)
    assert seen and all(d == jnp.bfloat16 for d in seen)  # inference-only: stored in the compute dtype
    summary = run_training(cfg(6), loss_fn=_kl_to_teacher)
    assert summary["steps"] == 6 and "eval_kl" in summary
    kls = [r["kl"] for r in read_metrics(tmp_path / "run") if "kl" in r]
    assert len(kls) == 6 and kls[-1] < kls[0]
    import json

    state_dir = tmp_path / "run" / "checkpoints" / "6" / "state"
    saved = json.loads((state_dir / "_METADATA").read_text())["tree_metadata"]
    assert any("embed_tokens" in k for k in saved) and not any("teacher" in k for k in saved)
    recorded = json.loads((state_dir.parent / "config" / "metadata").read_text())
    assert recorded["train"]["frozen"] == {"teacher": str(tmp_path / "teacher")}


def test_eval_tasks_run_during_training(tmp_path):
    """``train.eval_tasks`` run through ``minicpm_jax.eval`` at each evaluation and reach metrics.jsonl."""
    import os

    from minicpm_jax.config import load_recipe
    from minicpm_jax.train.loop import run_training
    from minicpm_jax.train.metrics import read_metrics

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    cfg = load_recipe(
        os.path.join(root, "configs/recipes/pretrain-tiny.yaml"),
        [
            f"train.output_dir={tmp_path}",
            "train.steps=4",
            "train.eval_every=2",
            "train.global_batch_size=8",
            "data.seq_len=32",
            "data.synthetic_documents=200",
            "data.eval_documents=0",
            "optimizer.warmup_steps=0",
            "optimizer.decay_steps=0",
            "train.eval_tasks.sums.task=exact_match",
            "train.eval_tasks.sums.dataset=arithmetic",
            "train.eval_tasks.sums.num_examples=4",
            "train.eval_tasks.sums.max_new_tokens=4",
        ],
    )
    summary = run_training(cfg)
    logged = [r for r in read_metrics(tmp_path) if "eval/sums/exact_match" in r]
    assert [r["step"] for r in logged] == [2, 4]  # every eval_every steps (the last one after the loop)
    assert all(0.0 <= r["eval/sums/exact_match"] <= 1.0 for r in logged)
    assert summary["eval/sums/exact_match"] == logged[-1]["eval/sums/exact_match"]
