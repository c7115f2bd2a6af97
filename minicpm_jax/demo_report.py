"""``render_report(report) -> str``: the markdown of ``minicpm-jax demo --full`` from its ``report.json``
(every number in the text comes from the JSON, so re-rendering a run's JSON gives its report)."""

from __future__ import annotations

import numpy as np

NOISE = 0.05  # accuracies at or below this are read as "no recall" in the prose


def _grid(lengths, depths, acc) -> list[str]:
    lines = ["| length \\ depth | " + " | ".join(f"{d:g}" for d in depths) + " |", "|---" * (len(depths) + 1) + "|"]
    lines += [f"| {n} | " + " | ".join(f"{a:.2f}" for a in row) + " |" for n, row in zip(lengths, acc)]
    return lines


def _pretrain(r: dict) -> list[str]:
    p = r["pretrain"]
    return [
        "## MiniCPM4 (steps 1-2)",
        "",
        "### Pretraining with muP and WSD",
        "",
        (
            "**Claim.** muP (embedding x `scale_emb`, residual branches x `scale_depth/sqrt(layers)`, logits / "
            "`hidden/dim_model_base`) makes hyperparameters transfer across widths, and the warmup-stable-decay "
            "schedule trains stably with the loss dropping in the decay phase."
        ),
        "",
        (
            f"**Toy.** A {p['layers']}-layer, hidden-{p['hidden']} MiniCPM4 ({p['params']:,} parameters; emb "
            f"x{p['scale_emb']:g}, residual x{p['residual_scale']:.4f}, logits / {p['logit_divisor']:g}), "
            f"{p['schedule']} schedule at peak lr {p['lr']:g}, {p['steps']} steps = {p['tokens']:,} tokens of the "
            f"synthetic corpus: training loss {p['first_loss']:.3f} -> {p['last_loss']:.3f}."
        ),
        "",
        f"![pretraining loss]({p['loss_curve']})",
        "",
        "**Differs.** One width, one run: the muP transfer itself (a width sweep) is not shown.",
        "",
    ]


def _sparse(r: dict) -> list[str]:
    s = r["sparse"]
    dense, sparse = float(np.mean(s["dense_acc"])), float(np.mean(s["sparse_acc"]))
    longest = max(s["lengths"])
    recall = max(dense, sparse) > NOISE
    return [
        "### InfLLM v2 sparse attention",
        "",
        (
            "**Claim.** Each query attends to the top-k key blocks chosen from compressed keys (plus the first "
            "block and a local window); on long contexts this keeps retrieval accuracy close to dense attention "
            "while cutting prefill and decode attention cost."
        ),
        "",
        (
            f"**Toy.** The step-1 weights loaded into a sparse config (block {s['block_size']}, top-{s['topk']}, "
            f"dense below {s['dense_len']} tokens), passkey retrieval at {s['lengths']} tokens x depths "
            f"{s['depths']} ({s['samples']} samples per cell): mean accuracy dense {dense:.2f}, sparse "
            f"{sparse:.2f}. Prefill (one jitted forward of a 1 x {longest} prompt): dense "
            f"{s['dense_prefill_s'] * 1e3:.1f} ms, sparse {s['sparse_prefill_s'] * 1e3:.1f} ms, ratio "
            f"sparse/dense **{s['prefill_ratio']:.2f}**."
        ),
        "",
        "Dense:",
        "",
        *_grid(s["lengths"], s["depths"], s["dense_acc"]),
        "",
        "Sparse:",
        "",
        *_grid(s["lengths"], s["depths"], s["sparse_acc"]),
        "",
        "![passkey dense](passkey_dense.png) ![passkey sparse](passkey_sparse.png)",
        "",
        "**Differs.** "
        + (
            "The toy does not recall pass keys at all (dense attention included), so both grids are at the noise "
            "floor and say nothing about sparse vs dense retrieval. "
            if not recall
            else "The model was trained at 128 tokens only, without sparse training. "
        )
        + (
            f"At {longest} tokens the sparse path is {1 / s['prefill_ratio']:.1f}x faster than dense on this "
            f"machine: each query reads at most {s['topk']} blocks of {s['block_size']} keys instead of all of them."
            if s["prefill_ratio"] < 1
            else f"At {longest} tokens and hidden {r['pretrain']['hidden']} the sparse path is slower than dense on "
            "this machine: key compression, block scoring and gathers cost more than the attention they save."
        ),
        "",
    ]


def _conversion(r: dict) -> list[str]:
    c, ev = r["conversion"], r["eval"]
    teacher, hybrid, lightning, scratch = (
        ev[k] for k in ("dense (pretrained)", "hybrid (converted)", "all-Lightning (converted)", "hybrid from scratch")
    )
    n = len(c["mixer_types"])
    recall = max(teacher["mqar"], hybrid["mqar"], lightning["mqar"]) > NOISE
    b = c["cache_bytes_per_token"]
    rows = ["| layer | CS | RT | score | stays softmax |", "|---|---|---|---|---|"]
    rows += [
        f"| {x['layer']} | {x['cs']:.4f} | {x['rt']:.4f} | {x['score']:.2f} | {x['softmax']} |" for x in c["selection"]
    ]
    beats = "beats" if hybrid["loss"] < scratch["loss"] else "does not beat"
    return [
        "## MiniCPM-SALA (step 3)",
        "",
        (
            "**Claim.** A trained Transformer converts into a hybrid (25% softmax/InfLLM v2 layers, 75% Lightning "
            "linear attention) by HALO transfer, per-layer alignment, layer selection, KL distillation and "
            "continual training, staying close to the teacher at a small fraction of its training tokens, better "
            "than the same hybrid trained from scratch, with recall kept by the selected softmax layers and a "
            "decode cache that no longer grows with context in the Lightning layers."
        ),
        "",
        f"**Toy.** {n} layers, softmax kept at {c['softmax_layers']} ({len(c['softmax_layers'])}/{n}); stages "
        + ", ".join(f"{k} {v}" for k, v in c["stage_steps"].items())
        + f" steps = {c['tokens']:,} tokens. Held-out loss: teacher {teacher['loss']:.4f}, converted "
        f"{hybrid['loss']:.4f} ({hybrid['loss'] / teacher['loss'] - 1:+.1%}), all-Lightning conversion "
        f"(softmax only at {[i for i, k in enumerate(c['all_lightning_mixer_types']) if k == 'minicpm4']}) "
        f"{lightning['loss']:.4f}, same hybrid from scratch on the same {c['tokens']:,} tokens "
        f"({c['scratch_steps']} steps) {scratch['loss']:.4f}: the conversion {beats} training from scratch. "
        f"MQAR accuracy: teacher {teacher['mqar']:.2f}, hybrid {hybrid['mqar']:.2f}, all-Lightning "
        f"{lightning['mqar']:.2f}; passkey: {teacher['passkey']:.2f} / {hybrid['passkey']:.2f} / "
        f"{lightning['passkey']:.2f}. Decode cache at {c['cache_capacity']} tokens (bf16): hybrid "
        f"{b['hybrid']:.0f} vs dense {b['dense']:.0f} bytes per token (x{c['cache_ratio']:.2f}).",
        "",
        "Layer selection (each candidate converted alone after stage 1; CS = -bits/byte, RT = MQAR accuracy):",
        "",
        *rows,
        "",
        "![layer selection](selection_scores.png)",
        "",
        "**Differs.** "
        + (
            "The teacher itself does not recall (MQAR at the noise floor), so the retrieval proxy of the layer "
            "selection is noise and hybrid vs all-Lightning recall cannot be tested at this scale."
            if not recall
            else "Recall numbers come from few samples; treat differences of one or two hits as noise."
        ),
        "",
    ]


def _opd(r: dict) -> list[str]:
    o, ev = r["opd"], r["eval"]
    lines = [
        "## On-policy distillation (step 4)",
        "",
        (
            "**Claim.** Distilling on the student's own rollouts (reverse KL on the student's top-k tokens) "
            "transfers a capability the student lacks from a compatible teacher; success goes with a rising "
            "top-k overlap between student and teacher, while a teacher of the same capability (same data, "
            "more training) teaches little."
        ),
        "",
        (
            f"**Toy.** Student: the step-1 model. Teachers: it trained {o['teacher_steps']} more steps on arithmetic "
            f"only (new capability) or on the same corpus (same capability). {o['steps']} OPD steps each, greedy "
            "arithmetic exact match on held-out prompts:"
        ),
        "",
        "| teacher | teacher EM | student EM before -> after | overlap ratio first -> last |",
        "|---|---|---|---|",
    ]
    for label, run in o["runs"].items():
        lines.append(
            f"| {label} | {ev[f'OPD teacher ({label})']['arithmetic']:.2f} | {run['exact_match'][0]:.2f} -> "
            f"{run['exact_match'][-1]:.2f} | {run['overlap_ratio'][0]:.2f} -> {run['overlap_ratio'][-1]:.2f} |"
        )
    gains = {k: v["exact_match"][-1] - v["exact_match"][0] for k, v in o["runs"].items()}
    new, same = gains["new capability"], gains["same capability"]
    teacher_em = ev["OPD teacher (new capability)"]["arithmetic"]
    weak = (
        f"The arithmetic teacher itself scores {teacher_em:.2f} exact match, so there is little capability to "
        "transfer at this budget. "
        if teacher_em <= NOISE
        else ""
    )
    lines += [
        "",
        "![OPD accuracy](opd_accuracy.png) ![OPD overlap](opd_overlap.png)",
        "",
        "Per-run overlap panels (`distill.plots.plot_run`): "
        + ", ".join(f"[{k}]({v['overlap_png']})" for k, v in o["runs"].items()),
        "",
        "**Differs.** "
        + weak
        + (
            f"The new-capability teacher gave the larger gain ({new:+.2f} vs {same:+.2f} exact match)."
            if new > same
            else f"The toy does not separate the two teachers: exact-match gains {new:+.2f} (new capability) vs "
            f"{same:+.2f} (same capability) in {o['steps']} steps."
        )
        + f" Overlap ratio at the first step: {o['runs']['new capability']['overlap_ratio'][0]:.2f} with the "
        f"new-capability teacher vs {o['runs']['same capability']['overlap_ratio'][0]:.2f} with the same-capability one."
        + " The cold start (teacher rollouts -> SFT) was not run (budget); the student and teachers are "
        "tiny and the prompts are toy arithmetic.",
        "",
    ]
    return lines


def render_report(r: dict) -> str:
    """The markdown report of a ``demo --full`` run from its report dict."""
    m, steps = r["machine"], r["steps"]
    lines = [
        f"# minicpm-jax demo --full ({r['mode']})",
        "",
        (
            f"`minicpm-jax demo --full{' --smoke' if r['mode'] == 'smoke' else ''}`, {m['date']}, {m['platform']}, "
            f"{m['device']}, load average {m['load_average']:.1f}: {r['total_seconds'] / 60:.1f} min in all."
        ),
        "",
        "| step | seconds |",
        "|---|---|",
        *(f"| {i}. {s['name']} | {s['seconds']:.0f} |" for i, s in enumerate(steps, 1)),
        "",
        *_pretrain(r),
        *_sparse(r),
        *_conversion(r),
        *_opd(r),
        "## Every model (step 5)",
        "",
        (
            "Held-out loss = log perplexity on `synthetic-eval.jsonl`; MQAR = accuracy over 2/4/8 pairs; passkey "
            "at the longest length; arithmetic = greedy exact match."
        ),
        "",
        "| model | mixers | params | held-out loss | MQAR | passkey | arithmetic |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {k} | {v['mixers']} | {v['params']:,} | {v['loss']:.4f} | {v['mqar']:.2f} | {v['passkey']:.2f} | "
            f"{v['arithmetic']:.2f} |"
            for k, v in r["eval"].items()
        ),
        "",
        "## Export (step 6)",
        "",
        (
            f"Max |logit difference| over {r['export']['tokens']} held-out tokens after export to Hugging Face "
            "layouts (fp32) and reload:"
        ),
        "",
        *(f"- {k}: {v:.2e}" for k, v in r["export"]["max_abs_logit_diff"].items()),
        "",
    ]
    return "\n".join(lines)
