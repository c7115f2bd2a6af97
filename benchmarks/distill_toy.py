"""Toy reproduction of on-policy distillation (spec/opd.md 6-8) on the synthetic arithmetic task, with
tiny models trained by this project on CPU.

Models (``minicpm-jax train``, skipped when ``RUNS/<name>/final`` exists):

- ``student``: the tiny MiniCPM4 pretrained briefly on the mixed synthetic corpus (weak at arithmetic);
- ``teacher``: the student trained further on arithmetic only (the capability the student lacks): 400
  steps (``teacher-400``, still 0 exact match), then 1500 more with a 300-step decay;
- ``peer``: the student's recipe from another seed (same data, same steps: a same-capability teacher).

Distillation runs (``minicpm-jax distill --config configs/recipes/distill-tiny.yaml``):

(a) ``a-teacher``: student <- teacher; (b) ``b-peer``: student <- peer; (c) ``c-cold-start``: (a) with
``cold_start.enabled=true`` (teacher rollouts -> SFT -> OPD), compared with (a) at its first steps.

Reported: overlap ratio first -> last step, greedy exact match (and the looser final-number accuracy)
of the student before / after and of the teacher, gap recovery ``(after - before) / (teacher - before)``,
and the initial overlap ratio with and without the cold start. Everything is evaluated in float32 with
the evaluation package exactly as the distillation run's ``train.eval_tasks`` does. Per-run diagnostic
PNGs (``distill.plots.plot_run``) and one combined figure go to ``benchmarks/results/distill_toy/``.

    python benchmarks/distill_toy.py                   # all stages, ~20 min on 2 busy CPU cores
    python benchmarks/distill_toy.py --steps 40 --runs a-teacher b-peer
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CLI = [str(Path(sys.executable).parent / "minicpm-jax")]
PRETRAIN = "configs/recipes/pretrain-tiny.yaml"
DISTILL = "configs/recipes/distill-tiny.yaml"
OUT = Path("benchmarks/results/distill_toy")
_NUMBER = re.compile(r"-?\d+")


def model_commands(runs: Path, args) -> dict[str, list[str]]:
    """The ``minicpm-jax train`` command line of each model."""
    size = list(args.model_overrides)
    base = [*CLI, "train", "--config", PRETRAIN, "train.eval_every=0", *size]
    return {
        "student": [*base, f"train.output_dir={runs}/student", f"train.steps={args.student_steps}"],
        "peer": [*base, f"train.output_dir={runs}/peer", f"train.steps={args.student_steps}", "seed=1"],
        "teacher-400": [
            *base,
            f"train.output_dir={runs}/teacher-400",
            f"train.steps={args.teacher_steps[0]}",
            "data.synthetic_tasks=[arithmetic]",
            f"train.init_from={runs}/student/final",
        ],
        "peer-400": [
            *base,
            f"train.output_dir={runs}/peer-400",
            f"train.steps={args.teacher_steps[0]}",
            "data.synthetic_tasks=[arithmetic]",
            f"train.init_from={runs}/peer/final",
        ],
        "teacher": [  # a second arithmetic-only run: its own warm-up and a longer (300-step) decay
            *base,
            f"train.output_dir={runs}/teacher",
            f"train.steps={args.teacher_steps[1]}",
            "data.synthetic_tasks=[arithmetic]",
            f"train.init_from={runs}/teacher-400/final",
            "optimizer.decay_steps=300",
            "train.log_every=50",
        ],
    }


SAMPLED, FULL_RKL = ["loss.loss=sampled", "loss.k=0"], ["loss.loss=full_vocab_rkl", "loss.k=0"]
COLD = ["cold_start.enabled=true"]
LONG = ["train.steps=300", "train.eval_every=50", "train.checkpoint_every=100"]  # 6x the OPD steps
XLONG = ["train.steps=2000", "train.eval_every=250", "train.checkpoint_every=1000"]  # 40x
# name -> (student model, teacher model, extra overrides). (a)/(b)/(c) as in the module docstring; the
# "2" runs repeat them with the student that has the answer format but not the arithmetic (teacher-400,
# exact match 0) and its same-capability peer (peer-400); a-* / a2-sampled change one option of (a).
RUNS = {
    "a-teacher": ("student", "teacher", []),
    "b-peer": ("student", "peer", []),
    "b-self": ("student", "student", []),
    "c-cold-start": ("student", "teacher", COLD),
    "a-sampled": ("student", "teacher", SAMPLED),
    "a-full-rkl": ("student", "teacher", FULL_RKL),
    "a-lr3e-4": ("student", "teacher", ["optimizer.learning_rate=0.0003"]),
    "a2-teacher": ("teacher-400", "teacher", []),
    "a2-sampled": ("teacher-400", "teacher", SAMPLED),
    "a2-full-rkl": ("teacher-400", "teacher", FULL_RKL),
    "a2-sampled-300": ("teacher-400", "teacher", [*SAMPLED, *LONG]),
    "a-sampled-300": ("student", "teacher", [*SAMPLED, *LONG]),
    "a2-sampled-2000": ("teacher-400", "teacher", [*SAMPLED, *XLONG]),
    "a2-full-rkl-2000": ("teacher-400", "teacher", [*FULL_RKL, *XLONG]),
    "a2-union": ("teacher-400", "teacher", ["loss.support=union"]),
    "b2-peer": ("teacher-400", "peer-400", []),
    "c2-cold-start": ("teacher-400", "teacher", COLD),
}


def distill_commands(runs: Path, args) -> dict[str, list[str]]:
    """The ``minicpm-jax distill`` command line of each distillation run."""
    base = [
        *CLI,
        "distill",
        "--config",
        DISTILL,
        f"train.steps={args.steps}",
        "train.log_every=1",
        f"train.eval_every={args.eval_every}",
        f"train.checkpoint_every={args.steps}",
        f"train.eval_tasks.arithmetic.num_examples={args.num_examples}",
        *args.distill_overrides,
    ]
    cold = [f"cold_start.num_prompts={args.cold_prompts}", f"cold_start.steps={args.cold_steps}"]
    return {
        name: [
            *base,
            f"student={runs}/{student}/final",
            f"teacher={runs}/{teacher}/final",
            f"output_dir={runs}/{name}",
            *extra,
            *(cold if extra == COLD else []),
        ]
        for name, (student, teacher, extra) in RUNS.items()
    }


def run(cmd: list[str], log: Path) -> float:
    """Runs ``cmd`` (output to ``log``); returns its wall seconds."""
    print("$", " ".join(cmd[len(CLI) - 1 :]).replace(CLI[0], "minicpm-jax"), flush=True)
    start = time.perf_counter()
    with log.open("w") as f:
        rc = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT)
    if rc:
        raise SystemExit(f"failed ({rc}): see {log}")
    wall = time.perf_counter() - start
    log.with_suffix(".wall").write_text(f"{wall:.0f}\n")
    return wall


def wall_of(runs: Path, name: str) -> float | None:
    """The wall seconds recorded beside a run's log (by ``run``, or by hand for runs launched in parallel)."""
    f = runs / f"{name}.wall"
    return float(f.read_text()) if f.is_file() else None


def evaluate_checkpoint(path: Path, num_examples: int, seed: int = 0) -> dict:
    """Greedy exact match (the distillation run's eval task, float32) and final-number accuracy."""
    import jax.numpy as jnp

    from minicpm_jax.ckpt import load_any
    from minicpm_jax.data.tokenizer import load_tokenizer
    from minicpm_jax.eval import evaluate

    _, model = load_any(path, dtype=jnp.float32, param_dtype=jnp.float32)
    tasks = {"arithmetic": {"task": "exact_match", "dataset": "arithmetic", "num_examples": num_examples}}
    tok_dir = str(path) if (path / "tokenizer.json").is_file() else None
    res = evaluate(model, tasks, tokenizer=load_tokenizer(tok_dir), seed=seed)["arithmetic"]
    return {"exact_match": res["metrics"]["exact_match"], "final_number": final_number_accuracy(res["rows"])}


def final_number_accuracy(rows) -> float:
    """Share of completions whose last integer is the answer's (the rollout reward's rule)."""
    ok = []
    for r in rows:
        got, want = _NUMBER.findall(r["completion"]), _NUMBER.findall(r["answer"])
        ok.append(bool(got) and bool(want) and got[-1] == want[-1])
    return float(np.mean(ok)) if ok else float("nan")


def series(run_dir: Path) -> dict[str, list]:
    """Per-step OPD diagnostics and the eval curve of a run's ``metrics.jsonl``."""
    from minicpm_jax.train.metrics import read_metrics

    records = read_metrics(run_dir)
    opd = [r for r in records if "opd/overlap_ratio" in r]
    ev = [r for r in records if "eval/arithmetic/exact_match" in r]
    keys = (
        "overlap_ratio",
        "overlap_token_adv",
        "entropy_gap",
        "student_entropy",
        "teacher_entropy",
        "topk_mass_student",
    )
    out = {"step": [r["step"] for r in opd], **{k: [r[f"opd/{k}"] for r in opd] for k in keys}}
    out["reward"] = [r.get("rollout/reward") for r in opd]
    out["loss"] = [r.get("loss") for r in opd]
    out["eval_step"] = [r["step"] for r in ev]
    out["eval_exact_match"] = [r["eval/arithmetic/exact_match"] for r in ev]
    return out


def summary_table(results: dict) -> str:
    """The markdown table of the runs (overlap, entropy, top-k mass: step 1 / mean of the first 5 / of the last 5)."""
    lines = [
        (
            "| run | student <- teacher | loss | overlap step 1 / first 5 / last 5 | student entropy first 5 -> last 5 "
            "| student top-16 mass last 5 | EM before -> after (teacher) | final-number acc after | gap recovery (EM) |"
        ),
        "|" + "---|" * 9,
    ]
    for name, r in results["runs"].items():
        s = r["series"]
        loss = next((x.split("=")[1] for x in RUNS[name][2] if x.startswith("loss.loss=")), "student_topk")
        loss += " +cold start" if RUNS[name][2] == COLD else ""
        loss += next((f" lr {x.split('=')[1]}" for x in RUNS[name][2] if x.startswith("optimizer.learning_rate")), "")
        loss += next((f" {x.split('=')[1]} support" for x in RUNS[name][2] if x.startswith("loss.support")), "")
        steps = s["step"][-1]
        gap = r["gap_recovery"]["exact_match"]
        lines.append(
            f"| {name} ({steps} steps) | {r['student']} <- {r['teacher_model']} | {loss} | "
            f"{s['overlap_ratio'][0]:.2f} / {_mean(s['overlap_ratio'], 5):.2f} / {_mean(s['overlap_ratio'], -5):.2f} | "
            f"{_mean(s['student_entropy'], 5):.2f} -> {_mean(s['student_entropy'], -5):.2f} | "
            f"{_mean(s['topk_mass_student'], -5):.2f} | "
            f"{r['before']['exact_match']:.3f} -> {r['after']['exact_match']:.3f} ({r['teacher']['exact_match']:.3f}) | "
            f"{r['after']['final_number']:.3f} | {'n/a' if gap is None else f'{gap:.2f}'} |"
        )
    return "\n".join(lines)


def _mean(xs, n):
    xs = [x for x in xs if x is not None]
    return float(np.mean(xs[:n])) if n > 0 else float(np.mean(xs[n:]))


PLOT_RUNS = ("a-teacher", "b-peer", "c-cold-start", "a2-teacher", "b2-peer", "c2-cold-start")
FIGURES = {  # file -> runs
    "opd_toy_ab.png": ["a-teacher", "b-peer", "b-self", "a2-teacher", "b2-peer"],
    "opd_toy_variants_cold_start.png": [
        "a-teacher",
        "a-sampled",
        "a-full-rkl",
        "a-lr3e-4",
        "c-cold-start",
        "a2-teacher",
        "a2-sampled",
        "a2-full-rkl",
        "a2-union",
        "c2-cold-start",
    ],
    "opd_toy_long.png": ["a-sampled-300", "a2-sampled-300", "a2-sampled-2000", "a2-full-rkl-2000"],
}


def combined_figure(results: dict, names: list[str], path: Path) -> None:
    """Overlap ratio, student entropy, held-out exact match and rollout reward vs OPD step of ``names``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4), dpi=72)
    names = [n for n in names if n in results["runs"]]
    for i, name in enumerate(names):
        r, s, c = results["runs"][name], results["runs"][name]["series"], f"C{i}"
        axes[0].plot(s["step"], s["overlap_ratio"], color=c, label=name, lw=1.2)
        axes[1].plot(s["step"], s["student_entropy"], color=c, label=name, lw=1.2)
        axes[2].plot(
            [0, *s["eval_step"]], [r["before"]["exact_match"], *s["eval_exact_match"]], "o-", color=c, label=name, ms=3
        )
        w = 5
        rew = np.convolve(np.asarray(s["reward"], float), np.ones(w) / w, mode="valid")
        axes[3].plot(s["step"][w - 1 :], rew, color=c, label=name, lw=1.2)
    axes[2].axhline(results["models"]["teacher"]["exact_match"], ls="--", lw=0.8, color="k", label="teacher")
    axes[0].set(title="top-k overlap ratio (k=16)", xlabel="OPD step", ylim=(0, 1.02))
    axes[1].set(title="student entropy on rollouts (nats)", xlabel="OPD step")
    axes[2].set(title="greedy exact match (64 held-out)", xlabel="OPD step (0 = start)", ylim=(-0.02, 1.0))
    axes[3].set(title="rollout reward (T=1, 5-step mean)", xlabel="OPD step", ylim=(-0.02, 1.0))
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs-dir", default="runs/distill-toy")
    parser.add_argument("--student-steps", type=int, default=150)
    parser.add_argument("--teacher-steps", type=int, nargs=2, default=[400, 1500], help="the two arithmetic-only runs")
    parser.add_argument("--model-overrides", nargs="*", default=[], help="e.g. model.hidden_size=128")
    parser.add_argument("--steps", type=int, default=50, help="OPD steps per run")
    parser.add_argument("--eval-every", type=int, default=10)
    parser.add_argument("--num-examples", type=int, default=64)
    parser.add_argument("--cold-prompts", type=int, default=128)
    parser.add_argument("--cold-steps", type=int, default=60)
    parser.add_argument("--distill-overrides", nargs="*", default=[])
    parser.add_argument("--runs", nargs="*", default=list(RUNS))
    parser.add_argument("--output", default=str(OUT / "results.json"))
    args = parser.parse_args()
    runs = Path(args.runs_dir)
    runs.mkdir(parents=True, exist_ok=True)
    OUT.mkdir(parents=True, exist_ok=True)
    walls, commands = {}, {}
    for name, cmd in model_commands(runs, args).items():
        commands[name] = cmd
        if not (runs / name / "final").is_dir():
            run(cmd, runs / f"{name}.log")
        walls[name] = wall_of(runs, name)
    models = {
        name: evaluate_checkpoint(runs / name / "final", args.num_examples)
        for name in ("student", "peer", "teacher-400", "peer-400", "teacher")
    }
    print("models:", json.dumps(models))
    results = {"args": vars(args), "models": models, "runs": {}, "wall_s": walls, "commands": {}}
    dcmds = distill_commands(runs, args)
    for name in args.runs:
        cmd, out = dcmds[name], runs / name
        commands[name] = cmd
        if not (out / "final").is_dir():
            shutil.rmtree(out, ignore_errors=True)
            run(cmd, runs / f"{name}.log")
        walls[name] = wall_of(runs, name)
        s = series(out)
        start = out / "cold-start" / "final"
        student_name, teacher_name, _ = RUNS[name]
        initial = models[student_name]  # the gap recovery counts from the student before any training here
        before = evaluate_checkpoint(start, args.num_examples) if start.is_dir() else initial
        after = evaluate_checkpoint(out / "final", args.num_examples)
        teacher = models[teacher_name]
        gap = {
            k: (after[k] - initial[k]) / (teacher[k] - initial[k]) if teacher[k] != initial[k] else None
            for k in ("exact_match", "final_number")
        }
        results["runs"][name] = {
            "overlap_first": s["overlap_ratio"][0],
            "overlap_last": s["overlap_ratio"][-1],
            "overlap_first5": _mean(s["overlap_ratio"], 5),
            "overlap_last5": _mean(s["overlap_ratio"], -5),
            "reward_first5": _mean(s["reward"], 5),
            "reward_last5": _mean(s["reward"], -5),
            "student": student_name,
            "teacher_model": teacher_name,
            "initial": initial,
            "before": before,
            "after": after,
            "teacher": teacher,
            "gap_recovery": gap,
            "plots": [str(p) for p in plot_copy(out, name)],
            "series": s,
        }
        print(name, json.dumps({k: v for k, v in results["runs"][name].items() if k != "series"}), flush=True)
    results["wall_s"] = walls
    results["commands"] = {k: " ".join(v).replace(CLI[0], "minicpm-jax") for k, v in commands.items()}
    results["load_average"] = os.getloadavg()[0]
    results["table"] = summary_table(results)
    print(results["table"])
    for file, names in FIGURES.items():
        if any(n in results["runs"] for n in names):
            combined_figure(results, names, OUT / file)
    for r in results["runs"].values():  # at most ~100 points per curve in the JSON (the figures use all)
        stride = -(-len(r["series"]["step"]) // 100)
        r["series"] = {k: v if k.startswith("eval") else v[::stride] for k, v in r["series"].items()}
    Path(args.output).write_text(json.dumps(results, indent=1))
    print(f"wrote {args.output}")


def plot_copy(run_dir: Path, name: str) -> list[Path]:
    """``plot_run`` of the run (into RUN_DIR/plots), with the overlap-ratio and entropy panels of the
    ``PLOT_RUNS`` copied to OUT/<name>_*.png."""
    from minicpm_jax.distill.plots import plot_run

    written = []
    for p in map(Path, plot_run(run_dir)):
        if name in PLOT_RUNS and p.stem in ("overlap_ratio", "entropy"):
            dst = OUT / f"{name}_{p.name}"
            shutil.copyfile(p, dst)
            written.append(dst)
    return written


if __name__ == "__main__":
    main()
