"""Layer selection (spec/sala.md 2.4): which layers stay softmax in the hybrid.

For each candidate layer i, the teacher with *only* layer i replaced by its stage-1 Lightning layer
is scored on a commonsense proxy CS_i and a retrieval proxy RT_i (each the mean of evaluation-task
metrics, higher is better); ``score_i = min(50, (max_j RT_j - RT_i) / (max_j CS_j - CS_i + 1e-10))``
(maxima over the candidates): a high score means converting layer i hurts recall more than it hurts
commonsense, so it stays softmax. The first and last layers are forced softmax (the SALA deviation);
the top-scored candidates fill the rest of the softmax budget ``round(ratio * layers)``.

A proxy is a list of ``{task, metric, higher_is_better (default true), **task options}`` entries of
``minicpm_jax.eval`` tasks, e.g. ``{task: perplexity, metric: bits_per_byte, higher_is_better: false,
paths: [...]}``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console

from minicpm_jax.convert.transfer import LIGHTNING, SOFTMAX, check_mixer_types, replace_mixers, transfer

SCORE_CAP, EPS = 50.0, 1e-10


def selection_scores(cs: Sequence[float], rt: Sequence[float]) -> list[float]:
    """HALO's importance score of every candidate from its CS and RT values."""
    if len(cs) != len(rt) or not cs:
        raise ValueError(f"selection_scores: {len(cs)} CS values vs {len(rt)} RT values (need the same, >= 1)")
    max_cs, max_rt = max(cs), max(rt)
    return [min(SCORE_CAP, (max_rt - r) / (max_cs - c + EPS)) for c, r in zip(cs, rt)]


def softmax_budget(num_layers: int, ratio: float, keep_first_last: bool) -> int:
    """How many layers stay softmax: ``round(ratio * num_layers)``, checked against the forced ones."""
    n = round(ratio * num_layers)
    forced = min(num_layers, 2) if keep_first_last else 0
    if n < 1:
        raise ValueError(
            f"convert.softmax_ratio={ratio}: {ratio} x {num_layers} layers rounds to {n} softmax layers; "
            "keep at least one (raise the ratio)"
        )
    if n < forced:
        raise ValueError(
            f"convert.softmax_ratio={ratio} keeps {n} softmax layer(s), but keep_first_last forces {forced}"
        )
    if n >= num_layers:
        raise ValueError(f"convert.softmax_ratio={ratio} keeps all {num_layers} layers softmax: nothing to convert")
    return n


def candidate_layers(num_layers: int, keep_first_last: bool) -> list[int]:
    """Layers that may become Lightning."""
    return [i for i in range(num_layers) if not (keep_first_last and i in (0, num_layers - 1))]


def initial_mixer_types(cv, teacher_cfg) -> tuple[str, ...]:
    """The stage-0 hybrid of a recipe's ``convert`` section: its ``mixer_types`` if given, else Lightning
    at every candidate layer (what stage 1 aligns before selection), checked against the teacher."""
    if cv.mixer_types is not None:
        return check_mixer_types(teacher_cfg, cv.mixer_types)
    n = teacher_cfg.num_hidden_layers
    softmax_budget(n, cv.softmax_ratio, cv.keep_first_last)
    candidates = candidate_layers(n, cv.keep_first_last)
    return tuple(LIGHTNING if i in candidates else SOFTMAX for i in range(n))


def choose_mixer_types(
    num_layers: int, candidates: Sequence[int], scores: Sequence[float], num_softmax: int
) -> tuple[str, ...]:
    """Forced layers (those not in ``candidates``) plus the top-scored candidates stay softmax; ties
    go to the lower layer index."""
    keep = [i for i in range(num_layers) if i not in candidates]
    ranked = sorted(zip(candidates, scores), key=lambda p: (-p[1], p[0]))
    keep += [i for i, _ in ranked[: max(0, num_softmax - len(keep))]]
    return tuple(SOFTMAX if i in keep else LIGHTNING for i in range(num_layers))


def proxy_value(model, entries: Sequence[dict], *, tokenizer, batch_size: int, seed: int) -> tuple[float, dict]:
    """``(mean signed metric, {label: metric value})`` of a proxy's evaluation tasks on ``model``."""
    from minicpm_jax.eval import evaluate

    if not entries:
        raise ValueError("convert.selection: a proxy needs at least one {task, metric, ...} entry")
    values, signed = {}, []
    for k, entry in enumerate(entries):
        options = dict(entry)
        task, metric = options.get("task"), options.pop("metric", None)
        higher = options.pop("higher_is_better", True)
        if task is None or metric is None:
            raise ValueError(f"convert.selection entry {entry!r}: needs 'task' and 'metric'")
        label = f"{k}:{task}"
        result = evaluate(model, {label: options}, tokenizer=tokenizer, batch_size=batch_size, seed=seed)[label]
        if metric not in result["metrics"]:
            raise ValueError(
                f"convert.selection: task {task!r} has no metric {metric!r}; it has {sorted(result['metrics'])}"
            )
        values[f"{task}/{metric}"] = result["metrics"][metric]
        signed.append(values[f"{task}/{metric}"] * (1 if higher else -1))
    return sum(signed) / len(signed), values


def select_layers(
    teacher,
    aligned,
    *,
    ratio: float,
    keep_first_last: bool,
    commonsense: Sequence[dict],
    retrieval: Sequence[dict],
    tokenizer,
    batch_size: int = 8,
    seed: int = 0,
    console: Console | None = None,
) -> dict:
    """Scores every candidate layer (teacher + that layer's stage-1 Lightning mixer from ``aligned``);
    returns ``{"mixer_types", "rows"}``."""
    console = console or Console()
    n = teacher.config.num_hidden_layers
    budget = softmax_budget(n, ratio, keep_first_last)
    candidates = [i for i in candidate_layers(n, keep_first_last) if aligned.config.layer_mixers[i] == LIGHTNING]
    rows = []
    for i in candidates:
        only_i = [LIGHTNING if j == i else SOFTMAX for j in range(n)]
        _, model = transfer(teacher, only_i, nope=False, output_gate=False, param_dtype=aligned.dtype)
        replace_mixers(model, aligned, [i])
        kw = dict(tokenizer=tokenizer, batch_size=batch_size, seed=seed)
        cs, cs_values = proxy_value(model, commonsense, **kw)
        rt, rt_values = proxy_value(model, retrieval, **kw)
        rows.append(
            {"layer": i, "cs": cs, "rt": rt, **{f"cs:{k}": v for k, v in cs_values.items()}}
            | {f"rt:{k}": v for k, v in rt_values.items()}
        )
        console.print(f"  layer {i}: CS {cs:.4f}  RT {rt:.4f}")
    scores = selection_scores([r["cs"] for r in rows], [r["rt"] for r in rows])
    mixer_types = choose_mixer_types(n, candidates, scores, budget)
    for row, score in zip(rows, scores):
        row.update(score=score, softmax=mixer_types[row["layer"]] == SOFTMAX)
    return {"mixer_types": list(mixer_types), "rows": rows}


def write_selection(directory: str | Path, selection: dict) -> list[str]:
    """``selection.json``, ``selection.md`` (one row per candidate) and ``scores.png`` in ``directory``."""
    from minicpm_jax.eval.plots import bars
    from minicpm_jax.eval.report import atomic_write_text

    out = Path(directory)
    rows = selection["rows"]
    atomic_write_text(out / "selection.json", json.dumps(selection, indent=2) + "\n")
    lines = ["| layer | CS | RT | score | stays softmax |", "|---|---|---|---|---|"]
    lines += [f"| {r['layer']} | {r['cs']:.4f} | {r['rt']:.4f} | {r['score']:.3f} | {r['softmax']} |" for r in rows]
    lines += ["", f"mixer_types: `{selection['mixer_types']}`"]
    atomic_write_text(out / "selection.md", "\n".join(lines) + "\n")
    png = bars(
        out / "scores.png",
        [r["layer"] for r in rows],
        [r["score"] for r in rows],
        highlight=[r["softmax"] for r in rows],
        title="layer selection: score (orange: stays softmax)",
        xlabel="layer",
        ylabel="min(50, dRT / dCS)",
    )
    return [str(out / "selection.json"), str(out / "selection.md"), png]
