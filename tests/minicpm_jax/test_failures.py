"""Bad inputs and faults against every command, run in-process through ``cli.main``.

Each case asserts the exit code, exactly one ``error:`` line on stderr naming the problem, no
traceback, and that nothing outside the case's temporary output changed (the shared inputs and the
repository's ``configs/`` are hashed before and after). Full disks and read-only filesystems are
simulated by making Python's file writes under the output raise ``OSError``.
"""

import builtins
import errno
import hashlib
import os
import pathlib
import shutil
import signal
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from train_testutil import SMALL_RUN

from minicpm_jax import cli
from minicpm_jax.ckpt import save_model
from minicpm_jax.config import load_config, load_recipe
from minicpm_jax.interop import save_hf_checkpoint
from minicpm_jax.model import create_model
from minicpm_jax.train.loop import run_training
from minicpm_jax.train.metrics import read_metrics

ROOT = Path(__file__).resolve().parents[2]
RECIPE = ROOT / "configs" / "recipes" / "pretrain-tiny.yaml"
# 4 steps, checkpoints at 2 and 4 (the shared run and every resume of it use these)
RUN = [*SMALL_RUN, "train.steps=4", "train.checkpoint_every=2", "optimizer.warmup_steps=0", "optimizer.decay_steps=0"]
CONVERT = ROOT / "configs" / "recipes" / "convert-tiny.yaml"
DISTILL = ROOT / "configs" / "recipes" / "distill-tiny.yaml"


def _digest(*roots: Path) -> str:
    h = hashlib.sha256()
    for root in roots:
        for p in sorted(root.rglob("*")):
            h.update(str(p.relative_to(root)).encode())
            if p.is_file():
                h.update(p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Inputs shared by every case (never changed): a native and an HF checkpoint, a 4-step run, recipes."""
    root = tmp_path_factory.mktemp("inputs")
    cfg = load_config("tiny-minicpm4", ["dtype=float32"]).model
    model = create_model(cfg, seed=0, dtype=jnp.float32)
    save_model(model, cfg, root / "native", tokenizer_source="byte")
    save_hf_checkpoint(model, cfg, root / "hf", dtype="float32", tokenizer_dir=root / "native")
    run_training(load_recipe(RECIPE, [f"train.output_dir={root / 'run'}", *RUN]))
    (root / "bad.yaml").write_text("model: tiny-minicpm4\ntrain: {steps: 3\n")
    (root / "list.yaml").write_text("- model\n- train\n")
    (root / "empty.yaml").write_text("# nothing\n")
    (root / "unknown.yaml").write_text("model: tiny-minicpm4\ntrain: {stepz: 3}\n")
    (root / "prompts.jsonl").write_text('{"prompt": "1+1="}\n{"prompt": "2+2="}\n')
    (root / "broken.jsonl").write_text('{"prompt": "1+1="}\n{"prompt": \n')
    (root / "report").mkdir()
    (root / "report" / "notes.txt").write_text("mine\n")
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _truncate(directory: Path, pattern: str) -> None:
    for p in directory.rglob(pattern):
        if p.is_file() and p.stat().st_size > 16:
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _fail_writes(monkeypatch, under: Path, code: int) -> None:
    """Every Python write (open for writing, mkdir) at or below ``under`` raises ``OSError(code)``."""
    under = str(under)

    def guard(path, mode="r"):
        if str(path).startswith(under) and any(c in str(mode) for c in "wax+"):
            raise OSError(code, os.strerror(code), str(path))

    real_open, real_path_open, real_mkdir = builtins.open, pathlib.Path.open, os.mkdir
    monkeypatch.setattr(builtins, "open", lambda f, mode="r", *a, **k: guard(f, mode) or real_open(f, mode, *a, **k))
    monkeypatch.setattr(
        pathlib.Path, "open", lambda self, mode="r", *a, **k: guard(self, mode) or real_path_open(self, mode, *a, **k)
    )
    monkeypatch.setattr(os, "mkdir", lambda p, *a, **k: guard(p, "w") or real_mkdir(p, *a, **k))


def _fail_writes_of(monkeypatch, name: str, code: int) -> None:
    """Writing to a file whose name contains ``name`` raises ``OSError(code)`` at the first ``write``."""
    real = pathlib.Path.open

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, _text):
            raise OSError(code, os.strerror(code))

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def fake(self, mode="r", *a, **k):
        f = real(self, mode, *a, **k)
        return Full(f) if name in self.name and "w" in mode else f

    monkeypatch.setattr(pathlib.Path, "open", fake)


def _nan_loss(monkeypatch):
    from minicpm_jax.train import loop
    from minicpm_jax.train.loss import next_token_loss

    def nan_loss(model, frozen, batch):
        loss_sum, aux = next_token_loss(model, frozen, batch)
        return loss_sum * np.nan, aux

    monkeypatch.setattr(loop, "pretrain_loss", lambda cfg: nan_loss)


def _sigterm_at_step_1(monkeypatch):
    from minicpm_jax.train.monitor import StepMonitor

    push = StepMonitor.push

    def push_then_term(self, step, metrics, tokens):
        push(self, step, metrics, tokens)
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(StepMonitor, "push", push_then_term)


def _train(out, *extra):
    return ["train", "--config", RECIPE, f"train.output_dir={out}", *RUN, *extra]


# (id, setup(assets, tmp, monkeypatch) -> argv, exit code, text the one error line must contain)
CASES = [
    # train: recipes and config values
    ("train-bad-yaml", lambda a, t, m: ["train", "--config", a / "bad.yaml"], 2, "bad.yaml:3:1: invalid YAML"),
    ("train-list-recipe", lambda a, t, m: ["train", "--config", a / "list.yaml"], 2, "top level is a list"),
    ("train-empty-recipe", lambda a, t, m: ["train", "--config", a / "empty.yaml"], 2, "the recipe is empty"),
    ("train-no-recipe", lambda a, t, m: ["train", "--config", a / "nope.yaml"], 2, "no such file"),
    ("train-unknown-key", lambda a, t, m: ["train", "--config", a / "unknown.yaml"], 2, "train.stepz: unknown key"),
    ("train-checkpoint-every-0", lambda a, t, m: _train(t / "r", "train.checkpoint_every=0"), 2, "checkpoint_every"),
    ("train-log-every-0", lambda a, t, m: _train(t / "r", "train.log_every=0"), 2, "train.log_every"),
    ("train-loss-chunk-0", lambda a, t, m: _train(t / "r", "train.loss_chunk_size=0"), 2, "train.loss_chunk_size"),
    ("train-keep-0", lambda a, t, m: _train(t / "r", "train.keep_checkpoints=0"), 2, "train.keep_checkpoints"),
    ("train-negative-ffn", lambda a, t, m: _train(t / "r", "model.intermediate_size=-4"), 2, "intermediate_size"),
    ("train-zero-layers", lambda a, t, m: _train(t / "r", "model.num_hidden_layers=0"), 2, "num_hidden_layers"),
    ("train-negative-lr", lambda a, t, m: _train(t / "r", "optimizer.learning_rate=-1"), 2, "learning_rate"),
    ("train-bad-resume", lambda a, t, m: _train(t / "r", "train.resume=maybe"), 2, "train.resume"),
    ("train-bad-batch", lambda a, t, m: _train(t / "r", "train.global_batch_size=12"), 2, "not divisible"),
    # train: resuming the shared run with another config
    (
        "resume-changed-shape",
        lambda a, t, m: _train(_copy(a / "run", t / "run"), "model.num_hidden_layers=3"),
        2,
        "model.num_hidden_layers: 2 -> 3",
    ),
    (
        "resume-changed-scalar",
        lambda a, t, m: _train(_copy(a / "run", t / "run"), "model.scale_emb=2.0"),
        2,
        "model.scale_emb: 12.0 -> 2.0",
    ),
    (
        "resume-changed-optimizer",
        lambda a, t, m: _train(_copy(a / "run", t / "run"), "optimizer.b2=0.99"),
        2,
        "optimizer.b2: 0.95 -> 0.99",
    ),
    (
        "resume-force-other-shapes",
        lambda a, t, m: _train(_copy(a / "run", t / "run"), "model.intermediate_size=96", "train.resume=force"),
        2,
        "does not fit the current model",
    ),
    (
        "resume-steps-below",
        lambda a, t, m: _train(_copy(a / "run", t / "run"), "train.steps=3"),
        2,
        "train.steps=3 is below step 4",
    ),
    # train: faults while running
    (
        "train-diverged-no-checkpoint",
        lambda a, t, m: (
            _nan_loss(m) or _train(t / "r", "train.max_consecutive_nonfinite=2", "train.checkpoint_every=9")
        ),
        3,
        "no checkpoint was saved",
    ),
    (
        "resume-then-diverged",
        lambda a, t, m: (
            _nan_loss(m) or _train(_copy(a / "run", t / "run"), "train.steps=8", "train.max_consecutive_nonfinite=2")
        ),
        3,
        "the newest checkpoint is step 4",
    ),
    ("train-sigterm", lambda a, t, m: _sigterm_at_step_1(m) or _train(t / "r"), 143, "stopped by SIGTERM at step 1"),
    ("train-disk-full", lambda a, t, m: _fail_writes(m, t, errno.ENOSPC) or _train(t / "r"), 2, "No space left"),
    ("train-read-only", lambda a, t, m: _fail_writes(m, t, errno.EROFS) or _train(t / "r"), 2, "Read-only file"),
    # info
    ("info-no-preset", lambda a, t, m: ["info", "tiny-nothing"], 2, "no preset or file 'tiny-nothing'"),
    ("info-zero-hidden", lambda a, t, m: ["info", "tiny-minicpm4", "model.hidden_size=0"], 2, "model.hidden_size"),
    (
        "info-indivisible-mesh",
        lambda a, t, m: ["info", "tiny-minicpm4", "mesh.tensor=16", "--devices", "16"],
        2,
        "not divisible by mesh axis tensor",
    ),
    (
        "info-bad-plan-meshes",
        lambda a, t, m: ["info", "tiny-minicpm4", "--train-plan", "--plan-meshes", "fsdp"],
        2,
        "--plan-meshes 'fsdp'",
    ),
    # import-hf
    ("import-no-source", lambda a, t, m: ["import-hf", t / "nothing", t / "out"], 2, "nothing: no config.json"),
    (
        "import-truncated-safetensors",
        lambda a, t, m: _truncate(_copy(a / "hf", t / "hf"), "*.safetensors") or ["import-hf", t / "hf", t / "out"],
        2,
        "model.safetensors: unreadable safetensors file",
    ),
    ("import-into-non-empty", lambda a, t, m: ["import-hf", a / "hf", a / "report"], 2, "give --overwrite"),
    (
        "import-into-the-source",
        lambda a, t, m: ["import-hf", a / "hf", a, "--overwrite"],
        2,
        "contains the source",
    ),
    (
        "import-into-a-run",
        lambda a, t, m: ["import-hf", a / "hf", _copy(a / "run", t / "run"), "--overwrite"],
        2,
        "contains a training run",
    ),
    (
        "import-disk-full",
        lambda a, t, m: _fail_writes(m, t, errno.ENOSPC) or ["import-hf", a / "hf", t / "out"],
        2,
        "No space left on device",
    ),
    ("import-model-override", lambda a, t, m: ["import-hf", a / "hf", t / "o", "model.vocab_size=3"], 2, "model.*"),
    # export-hf
    ("export-no-source", lambda a, t, m: ["export-hf", t / "nothing.yaml", t / "out"], 2, "no preset or file"),
    (
        "export-truncated-native",
        lambda a, t, m: _truncate(_copy(a / "native", t / "n") / "params", "*") or ["export-hf", t / "n", t / "out"],
        2,
        "params: unreadable checkpoint",
    ),
    (
        "export-truncated-hf",
        lambda a, t, m: _truncate(_copy(a / "hf", t / "hf"), "*.safetensors") or ["export-hf", t / "hf", t / "o"],
        2,
        "unreadable safetensors file",
    ),
    ("export-onto-a-file", lambda a, t, m: ["export-hf", a / "native", a / "prompts.jsonl"], 2, "give --overwrite"),
    (
        "export-onto-a-run",
        lambda a, t, m: ["export-hf", a / "run" / "final", a / "run", "--overwrite"],
        2,
        "contains the source",
    ),
    (
        "export-foreign-dir",
        lambda a, t, m: ["export-hf", a / "native", _copy(a / "report", t / "rep"), "--overwrite"],
        2,
        "not an earlier output of this kind",
    ),
    (
        "export-read-only",
        lambda a, t, m: _fail_writes(m, t, errno.EROFS) or ["export-hf", a / "native", t / "out"],
        2,
        "Read-only file system",
    ),
    (
        "export-disk-full",
        lambda a, t, m: _fail_writes(m, t, errno.ENOSPC) or ["export-hf", a / "native", t / "out"],
        2,
        "No space left on device",
    ),
    # generate
    (
        "generate-no-checkpoint",
        lambda a, t, m: ["generate", "--checkpoint", t / "no", "--prompt", "x"],
        2,
        "no such file or directory",
    ),
    (
        "generate-truncated-native",
        lambda a, t, m: (
            _truncate(_copy(a / "native", t / "n") / "params", "*")
            or ["generate", "--checkpoint", t / "n", "--prompt", "x", "--tokenizer", a / "native"]
        ),
        2,
        "params: unreadable checkpoint",
    ),
    (
        "generate-truncated-hf",
        lambda a, t, m: (
            _truncate(_copy(a / "hf", t / "hf"), "*.safetensors")
            or ["generate", "--checkpoint", t / "hf", "--prompt", "x"]
        ),
        2,
        "unreadable safetensors file",
    ),
    (
        "generate-broken-jsonl",
        lambda a, t, m: ["generate", "--checkpoint", a / "native", "--input", a / "broken.jsonl"],
        2,
        "broken.jsonl line 2: not valid JSON",
    ),
    (
        "generate-output-exists",
        lambda a, t, m: [
            "generate",
            "--checkpoint",
            a / "native",
            "--input",
            a / "prompts.jsonl",
            "--output",
            a / "prompts.jsonl",
        ],
        2,
        "give --overwrite",
    ),
    (
        "generate-output-is-input",
        lambda a, t, m: (
            ["generate", "--checkpoint", a / "native", "--input", a / "prompts.jsonl"]
            + ["--output", a / "prompts.jsonl", "--overwrite"]
        ),
        2,
        "contains the source",
    ),
    (
        "generate-disk-full",
        lambda a, t, m: (
            _fail_writes_of(m, "out.jsonl", errno.ENOSPC)
            or ["generate", "--checkpoint", a / "native", "--input", a / "prompts.jsonl", "--output", t / "out.jsonl"]
            + ["--max-new-tokens", "2"]
        ),
        2,
        "No space left on device while writing",
    ),
    (
        "generate-read-only",
        lambda a, t, m: (
            _fail_writes(m, t, errno.EROFS)
            or ["generate", "--checkpoint", a / "native", "--prompt", "x", "--output", t / "out.jsonl"]
        ),
        2,
        "Read-only file system",
    ),
    # eval
    (
        "eval-unknown-task",
        lambda a, t, m: ["eval", "--checkpoint", a / "native", "--tasks", "nope", "--output", t / "rep"],
        2,
        "unknown eval task(s) ['nope']",
    ),
    (
        "eval-bad-yaml",
        lambda a, t, m: ["eval", "--checkpoint", a / "native", "--config", a / "bad.yaml"],
        2,
        "bad.yaml:3:1: invalid YAML",
    ),
    (
        "eval-list-recipe",
        lambda a, t, m: ["eval", "--checkpoint", a / "native", "--config", a / "list.yaml"],
        2,
        "top level is a list",
    ),
    (
        "eval-non-empty-output",
        lambda a, t, m: ["eval", "--checkpoint", a / "native", "--tasks", "perplexity", "--output", a / "report"],
        2,
        "give --overwrite",
    ),
    (
        "eval-output-holds-checkpoint",
        lambda a, t, m: ["eval", "--checkpoint", a / "native", "--tasks", "perplexity", "--output", a, "--overwrite"],
        2,
        "contains the source",
    ),
    (
        "eval-truncated-hf",
        lambda a, t, m: (
            _truncate(_copy(a / "hf", t / "hf"), "*.safetensors")
            or ["eval", "--checkpoint", t / "hf", "--tasks", "perplexity", "--output", t / "rep"]
        ),
        2,
        "unreadable safetensors file",
    ),
    # convert
    ("convert-bad-yaml", lambda a, t, m: ["convert", "--config", a / "bad.yaml"], 2, "bad.yaml:3:1"),
    ("convert-empty-recipe", lambda a, t, m: ["convert", "--config", a / "empty.yaml"], 2, "the recipe is empty"),
    (
        "convert-foreign-output",
        lambda a, t, m: ["convert", "--config", CONVERT, f"teacher={a / 'native'}", f"output_dir={a / 'report'}"],
        2,
        "not an earlier convert run",
    ),
    (
        "convert-output-holds-teacher",
        lambda a, t, m: ["convert", "--config", CONVERT, f"teacher={a / 'native'}", f"output_dir={a}", "--overwrite"],
        2,
        "contains the source",
    ),
    # distill
    ("distill-no-recipe", lambda a, t, m: ["distill"], 2, "give --config RECIPE"),
    ("distill-bad-words", lambda a, t, m: ["distill", "plots", "x"], 2, "unexpected 'plots x'"),
    ("distill-list-recipe", lambda a, t, m: ["distill", "--config", a / "list.yaml"], 2, "top level is a list"),
    (
        "distill-foreign-output",
        lambda a, t, m: ["distill", "--config", DISTILL, f"output_dir={a / 'report'}"],
        2,
        "not an earlier distill run",
    ),
    # demo and argument parsing
    ("demo-bad-override", lambda a, t, m: ["demo", "--output", t / "d", "train.steps=0"], 2, "train.steps"),
    ("demo-unknown-argument", lambda a, t, m: ["demo", "--steps", "3"], 2, "unrecognized arguments: --steps"),
    ("unknown-command", lambda a, t, m: ["serve"], 2, "invalid choice: 'serve'"),
]


@pytest.mark.parametrize("setup,code,message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_error(assets, tmp_path, monkeypatch, capsys, setup, code, message):
    before = _digest(assets, ROOT / "configs")
    argv = [str(x) for x in setup(assets, tmp_path, monkeypatch)]
    try:
        got = cli.main(argv)
    except SystemExit as e:  # argparse
        got = e.code
    monkeypatch.undo()
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if "error:" in line]
    assert got == code, (out, err)
    assert len(errors) == 1 and message in errors[0], err
    assert "Traceback" not in out + err
    assert _digest(assets, ROOT / "configs") == before, "an input outside the temporary output changed"
    assert not [p for p in tmp_path.rglob("*") if ".tmp" in p.name], "a temporary file was left behind"
    assert not list(tmp_path.rglob("corrupt-step-*")), "a good checkpoint was moved aside as corrupt"


def test_enough_cases():
    assert len(CASES) >= 40 and {c[0].split("-")[0] for c in CASES} >= {
        "train",
        "resume",
        "info",
        "import",
        "export",
        "generate",
        "eval",
        "convert",
        "distill",
        "demo",
    }


def test_debug_shows_the_traceback(assets):
    with pytest.raises(ValueError, match="top level is a list"):
        cli.main(["train", "--config", str(assets / "list.yaml"), "--debug"])


def test_flipped_byte_falls_back_and_metrics_are_rewound(assets, tmp_path, capsys, caplog):
    """Same-size corruption of the newest checkpoint: a warning names the file, the run resumes from
    the previous checkpoint, and metrics.jsonl has each step once."""
    run = _copy(assets / "run", tmp_path / "run")
    victim = max(
        (p for p in (run / "checkpoints" / "4" / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))
    shutil.rmtree(run / "final")
    assert cli.main([str(x) for x in _train(run)]) == 0
    assert "resumed from" in capsys.readouterr().out
    warning = caplog.text  # the CLI's stderr (Python's last-resort logging handler) outside pytest
    assert victim.name in warning and "checksum mismatch" in warning and "skipping checkpoint step 4" in warning
    steps = [r["step"] for r in read_metrics(run) if "loss" in r]
    assert steps == [1, 2, 3, 4]
    assert (run / "final" / "model.yaml").is_file() and list((run / "checkpoints").glob("corrupt-step-4-*"))


def test_resume_fresh_moves_the_old_run_aside(assets, tmp_path, capsys):
    run = _copy(assets / "run", tmp_path / "run")
    assert cli.main([str(x) for x in _train(run, "train.resume=fresh")]) == 0
    (aside,) = run.glob("previous-*")
    assert sorted(p.name for p in aside.iterdir()) >= ["checkpoints", "final", "metrics.jsonl"]
    assert _digest(aside / "checkpoints") == _digest(assets / "run" / "checkpoints")
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]


def test_leftovers_of_an_interrupted_write_are_cleaned(assets, tmp_path, capsys):
    (tmp_path / ".out.tmp-deadbeef").mkdir()
    (tmp_path / ".out.tmp-deadbeef" / "half.safetensors").write_bytes(b"x")
    assert cli.main(["export-hf", str(assets / "native"), str(tmp_path / "out")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
