"""Multi-host training on ``jax.distributed``: 2 processes x 4 CPU devices (gloo collectives) train the
tiny recipe, are stopped by a SIGTERM sent to process 1 only (both save at the same step and exit),
resume and finish; their per-step losses and final parameters equal those of 1 process x 8 devices
fed the same global batches (``multihost_run.py reference``); the same for evaluation, conversion and
on-policy distillation."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from minicpm_jax import distributed
from minicpm_jax.ckpt import load_model, save_model
from minicpm_jax.config import load_config
from minicpm_jax.model import create_model

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
RUNNER = os.path.join(HERE, "multihost_run.py")
RECIPE = "configs/recipes/pretrain-tiny.yaml"
STEPS = 8
OVERRIDES = [
    f"train.steps={STEPS}",
    "train.global_batch_size=8",
    "mesh.data=2",
    "mesh.fsdp=4",
    "train.log_every=1",
    "train.checkpoint_every=100",
    "data.seq_len=64",
    "data.synthetic_documents=400",
    "data.eval_documents=8",
    "optimizer.warmup_steps=2",
    "optimizer.decay_steps=2",
]
TIMEOUT = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(out, port: int, *flags: str, env=None) -> list[subprocess.Popen]:
    return [
        subprocess.Popen(
            [sys.executable, RUNNER, "cli", "4", "train", "--config", RECIPE, "--coordinator", f"127.0.0.1:{port}"]
            + ["--num-processes", "2", "--process-id", str(i), *flags, *OVERRIDES, f"train.output_dir={out}"],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(2)
    ]


def _wait(procs, deadline: float) -> list[tuple[int, str]]:
    try:
        return [(p.wait(max(deadline - time.monotonic(), 1)), p.stderr.read()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def _losses(out) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == list(range(1, STEPS + 1)), steps  # each step logged once, across the resume
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _params(directory) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(load_model(directory, dtype=np.float32)[1]))]


def test_two_processes_stop_resume_and_match_one_process(tmp_path):
    deadline = time.monotonic() + TIMEOUT
    multi, single = tmp_path / "multi", tmp_path / "single"

    procs = _launch(multi, _free_port())
    while not (multi / "metrics.jsonl").is_file() or '"step": 2' not in (multi / "metrics.jsonl").read_text():
        assert all(p.poll() is None for p in procs), _wait(procs, deadline)
        assert time.monotonic() < deadline
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # a preemption notice on one host only
    stopped = _wait(procs, deadline)
    saved = sorted(int(p.name) for p in (multi / "checkpoints").iterdir() if p.name.isdigit())
    assert [code for code, _ in stopped] == [128 + signal.SIGTERM] * 2, stopped
    assert len(saved) == 1 and 2 <= saved[0] < STEPS, saved
    assert all(f"SIGTERM at step {saved[0]}" in err for _, err in stopped), stopped
    assert not (multi / "final").exists()

    resumed = _wait(_launch(multi, _free_port()), deadline)
    assert [code for code, _ in resumed] == [0, 0], resumed
    reference = subprocess.run(
        [
            sys.executable,
            RUNNER,
            "reference",
            "2",
            "train",
            "--config",
            RECIPE,
            *OVERRIDES,
            f"train.output_dir={single}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=max(deadline - time.monotonic(), 1),
    )
    assert reference.returncode == 0, reference.stderr[-3000:]

    got, want = _losses(multi), _losses(single)
    np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=1e-6, atol=0)
    for a, b in zip(_params(multi / "final"), _params(single / "final"), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    for name in ("model.yaml", "byte_tokenizer.json", "generation_config.json"):
        assert (multi / "final" / name).read_bytes() == (single / "final" / name).read_bytes()
    assert not list(tmp_path.glob("*/.*tmp*")) and not list(tmp_path.glob("*/final/.*"))


def test_a_host_failing_alone_stops_every_host_promptly(tmp_path):
    """Process 1 raises at step 3 (``MULTIHOST_FAIL``): it prints its one-line error and exits at once
    (no 300 s shutdown barrier); process 0, blocked in the step's collective, fails too instead of
    waiting for it (measured before the fix: both hung 324 s, then aborted)."""
    start = time.monotonic()
    env = os.environ | {"MULTIHOST_FAIL": "1:3"}
    procs = _launch(tmp_path / "run", _free_port(), "--heartbeat-timeout", "10", env=env)
    (code0, err0), (code1, err1) = _wait(procs, start + TIMEOUT)
    assert time.monotonic() - start < 120, (time.monotonic() - start, err0[-2000:], err1[-2000:])
    assert code1 == 2 and "error: injected failure at step 3" in err1, (code1, err1[-2000:])
    assert code0 not in (0, None, -signal.SIGKILL), (code0, err0[-2000:])
    assert not (tmp_path / "run" / "final").exists()


def test_two_processes_export_the_same_files_as_one(tmp_path):
    def export(out, devices: int, *distributed: str):
        args = ["export-hf", "tiny-minicpm4", str(out), "--dtype", "float32", "mesh.fsdp=-1", *distributed]
        return subprocess.Popen(
            [sys.executable, RUNNER, "cli", str(devices), *args],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    port = _free_port()
    multi = [
        export(
            tmp_path / "multi", 4, "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i)
        )
        for i in range(2)
    ]
    results = _wait([*multi, export(tmp_path / "single", 8)], time.monotonic() + TIMEOUT)
    assert [code for code, _ in results] == [0, 0, 0], results
    files = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "multi").iterdir()) and "model.safetensors" in files
    for name in files:
        assert (tmp_path / "multi" / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name


def _eval_data(tmp_path) -> dict:
    text = tmp_path / "heldout.txt"
    text.write_text("".join(f"{a}+{b}={a + b}\nkv x{a}={b} | x{a}? {b}\n" for a in range(9) for b in range(3)))
    choices = tmp_path / "choices.jsonl"
    rows = [{"context": f"{a}+{a}=", "choices": [str(2 * a), str(2 * a + 1), "x"], "gold": 0} for a in range(7)]
    choices.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {
        "ppl": {"task": "perplexity", "paths": str(text), "max_length": 64},
        "mc": {"task": "multiple_choice", "path": str(choices)},
        "pk": {"task": "passkey", "lengths": [64], "depths": [0.5], "num_samples": 3, "key_length": 1},
    }


def test_two_processes_evaluate_as_one(tmp_path):
    """``train.eval_tasks`` on a model over both processes (each feeds its rows; a hybrid mesh with the
    processes as DCN granules; span scoring gathered to every host), and ``eval`` with a
    whole model per process (each scores every other batch): the same metrics as one process."""
    tasks = _eval_data(tmp_path)
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(json.dumps({"tasks": tasks, "batch_size": 2}))
    train = [*OVERRIDES, "train.steps=2", "optimizer.decay_steps=0", "train.eval_every=0", "data.eval_documents=0"]
    train += [f"train.eval_tasks.{label}.{k}={v}" for label, options in tasks.items() for k, v in options.items()]

    def cli(devices: int, *args: str):
        return subprocess.Popen(
            [sys.executable, RUNNER, "cli", str(devices), *args],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )

    port, eval_port, multi = _free_port(), _free_port(), tmp_path / "multi"
    procs = [  # a hybrid mesh: data over the 2 processes (as granules), fsdp over each one's 4 devices
        cli(4, "train", "--config", RECIPE, *_join(port, i), *train, "mesh.dcn.data=2", f"train.output_dir={multi}")
        for i in range(2)
    ]
    evaluate = ["eval", "--checkpoint", "tiny-minicpm4", "--config", str(recipe)]
    procs += [cli(4, *evaluate, *_join(eval_port, i), "--output", str(tmp_path / "eval-multi")) for i in range(2)]
    procs.append(cli(8, *evaluate, "--output", str(tmp_path / "eval-single")))
    reference = [sys.executable, RUNNER, "reference", "2", "train", "--config", RECIPE, *train]
    reference.append(f"train.output_dir={tmp_path / 'single'}")
    procs.append(subprocess.Popen(reference, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE))
    results = _wait(procs, time.monotonic() + TIMEOUT)
    assert [code for code, _ in results] == [0] * 6, results

    def final_metrics(out) -> dict:
        record = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
        return {k: v for k, v in record.items() if k.startswith("eval/")}

    got, want = final_metrics(tmp_path / "multi"), final_metrics(tmp_path / "single")
    assert sorted(got) == sorted(want) and {"eval/ppl/perplexity", "eval/mc/acc", "eval/pk/acc"} <= set(got), got
    np.testing.assert_allclose([got[k] for k in want], list(want.values()), rtol=1e-6, atol=0)

    def report(out) -> dict:
        return {k: r["metrics"] for k, r in json.loads((out / "report.json").read_text())["results"].items()}

    assert report(tmp_path / "eval-multi") == report(tmp_path / "eval-single")  # bit for bit
    listing = [sorted(p.name for p in (tmp_path / run).iterdir()) for run in ("eval-multi", "eval-single")]
    assert listing[0] == listing[1] == ["passkey_heatmap.png", "report.json", "report.md"]


def test_two_processes_convert_as_one(tmp_path):
    """``minicpm-jax convert`` (transfer, an align and a kl stage on the engine, mixer_types given) on 2
    processes: the same per-step losses and hybrid as 1 process fed the same global batches. (Adam's eps
    is 1e-6: with the default 1e-8, the near-zero gradients of a few Lightning weights get normalised
    to lr-sized steps, and their summation-order noise moves those weights by up to 1e-5.)"""
    cfg = load_config("tiny-minicpm4", ["model.num_hidden_layers=2", "model.vocab_size=320"]).model
    teacher = save_model(
        create_model(cfg, seed=1, dtype=jnp.float32), cfg, tmp_path / "teacher", tokenizer_source="byte"
    )
    recipe = {
        "teacher": str(teacher),
        "mesh": {"data": 2, "fsdp": 4},
        "dtype": "float32",
        "data": {"source": "synthetic", "seq_len": 32, "synthetic_documents": 200, "eval_documents": 0},
        "optimizer": {"learning_rate": 0.01, "schedule": "constant", "eps": 1e-6},
        "train": {"global_batch_size": 8, "steps": 2, "log_every": 1, "checkpoint_every": 100},
        "convert": {"mixer_types": ["minicpm4", "lightning-attn"], "export_hf": False},
        "stages": [{"name": "align", "loss": "align"}, {"name": "kl", "loss": "kl"}],
    }
    (tmp_path / "convert.yaml").write_text(json.dumps(recipe))
    _two_and_one(tmp_path, ["convert", "--config", str(tmp_path / "convert.yaml")], ["reference", "2"])

    for stage in ("stage-1-align", "stage-2-kl"):
        got, want = (_stage_losses(tmp_path / run / stage) for run in ("multi", "single"))
        assert len(want) == 2, want
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)  # kl losses near 0: absolute 1e-7
    for stage in ("stage-1-align", "stage-2-kl"):
        finals = (_params(tmp_path / run / stage / "final") for run in ("multi", "single"))
        for a, b in zip(*finals, strict=True):
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    summaries = [json.loads((tmp_path / run / "conversion.json").read_text()) for run in ("multi", "single")]
    assert summaries[0]["mixer_types"] == summaries[1]["mixer_types"] == ["minicpm4", "lightning-attn"]
    assert not list(tmp_path.glob("multi/**/.*tmp*"))


def test_two_processes_distill_as_one(tmp_path):
    """``minicpm-jax distill`` on 2 processes: rollouts generated on the mesh spanning both (gathered to
    every host), scored, trained, validated with ``exact_match`` (generation again); the same per-step
    losses, validation metrics and final student as 1 process x 8 devices."""
    cfg = load_config("tiny-minicpm4", ["model.num_hidden_layers=2"]).model
    models = {
        name: str(
            save_model(create_model(cfg, seed=seed, dtype=jnp.float32), cfg, tmp_path / name, tokenizer_source="byte")
        )
        for name, seed in (("student", 1), ("teacher", 2))
    }
    recipe = models | {
        "mesh": {"data": 2, "fsdp": 4},
        "dtype": "float32",
        "prompts": {"sets": [{"source": "synthetic", "dataset": "arithmetic", "num_prompts": 16, "seed": 1}]},
        "rollout": {"n": 2, "prompts_per_step": 4, "max_prompt_tokens": 16, "max_new_tokens": 8, "chunk_tokens": 64},
        "optimizer": {"learning_rate": 0.003, "eps": 1e-6},
        "train": {"steps": 2, "log_every": 1, "checkpoint_every": 100, "eval_every": 2},
    }
    recipe["train"]["eval_tasks"] = {"em": {"task": "exact_match", "dataset": "arithmetic", "num_examples": 6}}
    (tmp_path / "distill.yaml").write_text(json.dumps(recipe))
    _two_and_one(tmp_path, ["distill", "--config", str(tmp_path / "distill.yaml")], ["cli", "8"])

    got, want = (_stage_losses(tmp_path / run) for run in ("multi", "single"))
    assert len(want) == 2, want
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)
    evals = [
        [
            r
            for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())
            if "eval/em/exact_match" in r
        ]
        for run in ("multi", "single")
    ]
    assert len(evals[1]) == 1 and evals[0][0]["eval/em/exact_match"] == evals[1][0]["eval/em/exact_match"], evals
    for a, b in zip(*(_params(tmp_path / run / "final") for run in ("multi", "single")), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def _two_and_one(tmp_path, args: list[str], single: list[str]) -> None:
    """``minicpm-jax ARGS`` by 2 processes x 4 devices (``output_dir=multi``) and at the same time by one
    process (``output_dir=single``; ``single``: the runner's ``reference 2`` or ``cli 8``); all exit 0."""
    port = _free_port()
    commands = [["cli", "4", *args, *_join(port, i), f"output_dir={tmp_path / 'multi'}"] for i in range(2)]
    commands.append([*single, *args, f"output_dir={tmp_path / 'single'}"])
    procs = [
        subprocess.Popen([sys.executable, RUNNER, *c], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        for c in commands
    ]
    results = _wait(procs, time.monotonic() + TIMEOUT)
    assert [code for code, _ in results] == [0, 0, 0], results


def _stage_losses(stage_dir) -> list[float]:
    return [r["loss"] for r in map(json.loads, (stage_dir / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def _join(port: int, process_id: int) -> list[str]:
    return ["--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(process_id)]


def test_initialize_refuses_incomplete_or_out_of_range_arguments():
    with pytest.raises(ValueError, match="given together"):
        distributed.initialize("127.0.0.1:1234", 2)
    with pytest.raises(ValueError, match="--process-id 2: must be in 0..1"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(ValueError, match="--heartbeat-timeout 0: must be >= 1 second"):
        distributed.initialize("127.0.0.1:1234", 2, 0, heartbeat_timeout=0)
    assert not distributed.multiprocess() and distributed.is_main()


def test_row_groups_must_not_span_processes():
    devices = np.array([SimpleNamespace(process_index=i // 4) for i in range(8)])
    mesh = SimpleNamespace(
        devices=devices.reshape(2, 2, 2, 1), shape={"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}
    )
    distributed.check_rows(mesh)  # tensor pairs inside a process
    mesh = SimpleNamespace(
        devices=devices.reshape(1, 1, 8, 1), shape={"data": 1, "fsdp": 1, "tensor": 8, "sequence": 1}
    )
    with pytest.raises(ValueError, match=r"1 data x fsdp row group\(s\) span several processes.*8 devices"):
        distributed.check_rows(mesh)
