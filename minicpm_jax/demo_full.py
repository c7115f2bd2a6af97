"""``minicpm-jax demo --full``: the three papers (MiniCPM4, MiniCPM-SALA, on-policy distillation) at toy
scale in one command, composed from the library's own runs.

1. pretrain a tiny dense MiniCPM4 (muP, WSD) on the synthetic corpus (``train.loop.run_training``);
2. load its weights into an InfLLM v2 sparse config: passkey grids dense vs sparse, prefill time ratio;
3. convert it to a 25%-softmax hybrid (``convert.run_conversion``), an all-Lightning conversion and the
   same hybrid trained from scratch on as many tokens; cache bytes per token;
4. distil the model on-policy from a teacher trained further on arithmetic (new capability) and from
   one trained further on the same corpus (same capability) (``distill.run_distill``);
5. evaluate every model (``eval.evaluate``); 6. export the hybrid and a student to Hugging Face layouts
   and reload them (JAX; PyTorch ``transformers`` for the Llama layout).

Everything measured goes to ``OUT/report.json``; ``OUT/report.md`` is ``render_report`` of it.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from rich.console import Console

from minicpm_jax.ckpt import load_any
from minicpm_jax.config import CONFIG_DIR, load_recipe
from minicpm_jax.config.loading import build_config, load_config
from minicpm_jax.convert import load_convert_recipe, run_conversion
from minicpm_jax.convert.recipe import stage_tokens
from minicpm_jax.data import load_tokenizer
from minicpm_jax.demo_report import render_report
from minicpm_jax.distill import load_distill_recipe, run_distill
from minicpm_jax.distill.plots import plot_run
from minicpm_jax.eval import evaluate
from minicpm_jax.eval.plots import curves, heatmap
from minicpm_jax.eval.report import atomic_write_text
from minicpm_jax.interop import load_hf_checkpoint, save_hf_checkpoint
from minicpm_jax.model import create_model, param_count
from minicpm_jax.model.cache import cache_bytes
from minicpm_jax.train.loop import run_training
from minicpm_jax.train.metrics import read_metrics

RECIPES = CONFIG_DIR / "recipes"
HELD_OUT = str(RECIPES / "data" / "synthetic-eval.jsonl")
F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class Budget:
    """Sizes of one demo run (steps per stage, evaluation samples)."""

    layers: int = 12
    softmax_ratio: float = 0.25  # 3 of 12 layers: the first, the last and one selected
    batch: int = 16
    pretrain_steps: int = 400
    lengths: tuple[int, ...] = (64, 128, 256, 512, 1000)  # passkey lengths (dense_len is 64)
    depths: tuple[float, ...] = (0.0, 0.5, 1.0)
    samples: int = 4  # passkey samples per cell
    align: int = 100
    distill: int = 100
    continual: int = 50
    teacher_steps: int = 200  # the OPD teachers' further training
    opd_steps: int = 30
    opd_eval_every: int = 10
    examples: int = 32  # arithmetic / MQAR examples
    documents: int = 32  # held-out documents
    rollout: tuple[str, ...] = ()


FULL = Budget()
SMOKE = Budget(
    layers=4,
    softmax_ratio=0.75,  # the first, the last and one of the two others
    batch=8,  # divisible by the 8 fake devices of the tests
    pretrain_steps=6,
    lengths=(64, 128),
    depths=(0.5,),
    samples=1,
    align=2,
    distill=2,
    continual=2,
    teacher_steps=2,
    opd_steps=2,
    opd_eval_every=2,
    examples=2,
    documents=2,
    rollout=("rollout.n=4", "rollout.prompts_per_step=2", "rollout.max_new_tokens=8"),
)


def eval_tasks(b: Budget) -> dict:
    """The tasks every model of the run is scored on."""
    return {
        "ppl": {
            "task": "perplexity",
            "paths": [HELD_OUT],
            "max_length": 128,
            "stride": 64,
            "max_documents": b.documents,
        },
        "mqar": {"task": "mqar", "num_pairs": [2, 4, 8], "num_queries": 1, "num_samples": b.examples},
        "passkey": {"task": "passkey", "lengths": [max(b.lengths)], "depths": list(b.depths), "num_samples": b.samples},
        "arithmetic": {"task": "exact_match", "dataset": "arithmetic", "num_examples": b.examples},
    }


class FullDemo:
    """One run into ``output`` (see the module docstring); ``run()`` returns the report dict."""

    def __init__(self, output: Path, overrides: list[str], console: Console, smoke: bool):
        self.out, self.overrides, self.console = output, overrides, console
        self.budget, self.runs = SMOKE if smoke else FULL, output / "runs"
        self.tok, self.models = load_tokenizer(None), {}
        self.report = {"mode": "smoke" if smoke else "full", "budget": dataclasses.asdict(self.budget), "steps": []}

    def run(self) -> dict:
        shutil.rmtree(self.runs, ignore_errors=True)  # always from scratch
        self.out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        steps = (self.pretrain, self.sparse, self.conversion, self.opd, self.evaluate_all, self.export)
        for n, step in enumerate(steps, 1):
            t = time.perf_counter()
            line = step()
            seconds = time.perf_counter() - t
            self.report["steps"].append({"name": step.__name__, "seconds": seconds})
            self.console.print(f"[bold cyan][{n}/{len(steps)}][/] {line} [dim]({seconds:.1f}s)[/]", highlight=False)
        self.report |= {"total_seconds": time.perf_counter() - start, "machine": machine()}
        atomic_write_text(self.out / "report.json", json.dumps(self.report, indent=1) + "\n")
        atomic_write_text(self.out / "report.md", render_report(self.report))
        self.console.print(f"report -> {self.out / 'report.md'} ({self.report['total_seconds']:.0f}s in all)")
        return self.report

    def _train(self, name: str, steps: int, **changes) -> Path:
        """``run_training`` of the step-1 run config with ``steps`` (WSD scaled to them) and ``changes``."""
        raw = self.cfg.model_dump(mode="json")
        raw["optimizer"] |= {"warmup_steps": steps // 15, "decay_steps": max(1, steps // 5)}
        raw["train"] |= {"steps": steps, "output_dir": str(self.runs / name), "checkpoint_every": steps}
        raw["train"] |= {"log_every": max(1, steps // 40), "eval_every": 0}
        for section, values in changes.items():
            raw[section] |= values
        run_training(build_config(raw), console=self.console)
        return self.runs / name / "final"

    # ----- 1. pretraining -----

    def pretrain(self) -> str:
        b = self.budget
        self.cfg = load_recipe(RECIPES / "pretrain-tiny.yaml", [f"model.num_hidden_layers={b.layers}", *self.overrides])
        self.cfg = self.cfg.model_copy(
            update={"train": self.cfg.train.model_copy(update={"global_batch_size": b.batch})}
        )
        self.dense = self._train("pretrain", b.pretrain_steps)
        self.models["dense (pretrained)"] = self.dense
        records = [r for r in read_metrics(self.runs / "pretrain") if "loss" in r]
        curves(
            self.out / "pretrain_loss.png",
            [r["step"] for r in records],
            {"train loss": [r["loss"] for r in records]},
            title="pretraining loss (muP, WSD)",
            xlabel="step",
            ylabel="loss",
            ylim=None,
        )
        m, o = self.cfg.model, self.cfg.optimizer
        r = self.report["pretrain"] = {
            "layers": m.num_hidden_layers,
            "hidden": m.hidden_size,
            "params": param_count(m),
            "scale_emb": m.scale_emb,
            "residual_scale": m.residual_scale,
            "logit_divisor": m.logit_divisor,
            "schedule": o.schedule,
            "lr": o.learning_rate,
            "steps": b.pretrain_steps,
            "tokens": b.pretrain_steps * b.batch * self.cfg.data.seq_len,
            "first_loss": records[0]["loss"],
            "last_loss": records[-1]["loss"],
            "loss_curve": "pretrain_loss.png",
        }
        return f"pretrained a {r['layers']}-layer MiniCPM4 ({r['params']} params): loss {r['first_loss']:.3f} -> {r['last_loss']:.3f}"

    # ----- 2. InfLLM v2 sparse mode -----

    def sparse(self) -> str:
        b = self.budget
        cfg, dense = load_any(self.dense, dtype=F32, param_dtype=F32)
        sparse_cfg = cfg.model_copy(update={"sparse_config": load_config("tiny-minicpm4-sparse").model.sparse_config})
        sparse = create_model(sparse_cfg, dtype=F32, param_dtype=F32)
        nnx.update(sparse, nnx.state(dense, nnx.Param))
        self.models["dense in sparse mode"] = sparse
        task = {"passkey": {"lengths": list(b.lengths), "depths": list(b.depths), "num_samples": b.samples}}
        r = self.report["sparse"] = {"lengths": list(b.lengths), "depths": list(b.depths), "samples": b.samples}
        r |= {"dense_len": sparse_cfg.sparse_config.dense_len, "topk": sparse_cfg.sparse_config.topk}
        r |= {"block_size": sparse_cfg.sparse_config.block_size}
        for name, model in (("dense", dense), ("sparse", sparse)):
            rows = evaluate(model, task, tokenizer=self.tok, batch_size=8)["passkey"]["rows"]
            grid = [
                [next(x["acc"] for x in rows if x["length"] == n and x["depth"] == d) for d in b.depths]
                for n in b.lengths
            ]
            heatmap(
                self.out / f"passkey_{name}.png",
                np.array(grid),
                list(b.lengths),
                [f"{d:g}" for d in b.depths],
                title=f"passkey accuracy, {name} attention",
                xlabel="needle depth",
                ylabel="context length (tokens)",
            )
            r[f"{name}_acc"] = grid
            r[f"{name}_prefill_s"] = prefill_seconds(model, max(b.lengths))
        r["prefill_ratio"] = r["sparse_prefill_s"] / r["dense_prefill_s"]
        return (
            f"InfLLM v2 sparse mode on the same weights: passkey mean accuracy dense {np.mean(r['dense_acc']):.2f}, "
            f"sparse {np.mean(r['sparse_acc']):.2f}; sparse/dense prefill time at {max(b.lengths)} tokens "
            f"{r['prefill_ratio']:.2f}"
        )

    # ----- 3. conversion to a hybrid -----

    def conversion(self) -> str:
        b, n = self.budget, self.budget.layers
        cs = f"[{{task: perplexity, metric: bits_per_byte, higher_is_better: false, paths: [{HELD_OUT}], max_length: 128, max_documents: {b.documents}}}]"
        rt = f"[{{task: mqar, metric: acc, num_pairs: [2, 4, 8], num_queries: 1, num_samples: {b.examples}}}]"
        base = [
            f"teacher={self.dense}",
            f"convert.softmax_ratio={b.softmax_ratio}",
            "convert.export_hf=false",
            f"data.synthetic_tasks=[{','.join(self.cfg.data.synthetic_tasks)}]",
            "data.task_rows=[]",  # the step-1 model's data: no task rows
            f"train.global_batch_size={b.batch}",
            f"optimizer.warmup_steps={min(10, b.align // 5)}",
            f"stages.align.train.steps={b.align}",
            f"stages.distill.train.steps={b.distill}",
            f"stages.continual.train.steps={b.continual}",
            f"convert.selection.commonsense={cs}",
            f"convert.selection.retrieval={rt}",
        ]
        recipe = load_convert_recipe(RECIPES / "convert-tiny.yaml", [*base, f"output_dir={self.runs / 'convert'}"])
        hybrid = run_conversion(recipe, self.console)
        all_lightning = ["minicpm4"] + ["lightning-attn"] * (n - 1)
        lightning = run_conversion(
            load_convert_recipe(
                RECIPES / "convert-tiny.yaml",
                [
                    *base,
                    f"output_dir={self.runs / 'convert-all-lightning'}",
                    f"convert.mixer_types=[{','.join(all_lightning)}]",
                ],
            ),
            self.console,
        )
        self.hybrid = Path(hybrid["final"])
        tokens = stage_tokens(recipe)
        hybrid_cfg = load_any(self.hybrid, dtype=F32)[0]
        raw_model = hybrid_cfg.model_dump(mode="json")
        steps = tokens // (b.batch * self.cfg.data.seq_len)
        scratch = self._train("scratch-hybrid", steps, model=raw_model)
        self.models |= {"hybrid (converted)": self.hybrid, "all-Lightning (converted)": Path(lightning["final"])}
        self.models["hybrid from scratch"] = scratch
        shutil.copyfile(self.runs / "convert" / "selection" / "scores.png", self.out / "selection_scores.png")
        selection = json.loads((self.runs / "convert" / "selection" / "selection.json").read_text())
        capacity = self.cfg.model.max_position_embeddings
        per_token = {
            k: cache_bytes(c, 1, capacity) / capacity for k, c in (("dense", self.cfg.model), ("hybrid", hybrid_cfg))
        }
        self.report["conversion"] = {
            "mixer_types": hybrid["mixer_types"],
            "all_lightning_mixer_types": lightning["mixer_types"],
            "softmax_layers": [i for i, k in enumerate(hybrid["mixer_types"]) if k == "minicpm4"],
            "selection": selection["rows"],
            "stage_steps": {s.name: {**recipe.train, **s.train}["steps"] for s in recipe.stages},
            "tokens": tokens,
            "scratch_steps": steps,
            "cache_capacity": capacity,
            "cache_bytes_per_token": per_token,
            "cache_ratio": per_token["hybrid"] / per_token["dense"],
        }
        return (
            f"converted to a hybrid with softmax layers {self.report['conversion']['softmax_layers']} of {n} "
            f"({tokens} tokens), plus an all-Lightning conversion and the hybrid from scratch; decode cache "
            f"{per_token['hybrid']:.0f} vs {per_token['dense']:.0f} bytes/token"
        )

    # ----- 4. on-policy distillation -----

    def opd(self) -> str:
        b = self.budget
        arith = {"arithmetic": {"task": "exact_match", "dataset": "arithmetic", "num_examples": b.examples}}
        corpora = {"new capability": ["arithmetic"], "same capability": list(self.cfg.data.synthetic_tasks)}
        runs, before = {}, None
        for i, (label, tasks) in enumerate(corpora.items()):
            teacher = self._train(
                f"teacher-{i}", b.teacher_steps, train={"init_from": str(self.dense)}, data={"synthetic_tasks": tasks}
            )
            self.models[f"OPD teacher ({label})"] = teacher
            recipe = load_distill_recipe(
                RECIPES / "distill-tiny.yaml",
                [
                    f"student={self.dense}",
                    f"teacher={teacher}",
                    f"output_dir={self.runs / f'opd-{i}'}",
                    f"train.steps={b.opd_steps}",
                    "train.log_every=1",
                    f"train.eval_every={b.opd_eval_every}",
                    f"train.checkpoint_every={b.opd_steps}",
                    f"train.eval_tasks={json.dumps(arith)}",
                    *b.rollout,
                ],
            )
            if before is None:
                student = load_any(self.dense, dtype=F32, param_dtype=F32)[1]
                res = evaluate(student, arith, tokenizer=self.tok, seed=recipe.seed)
                before = res["arithmetic"]["metrics"]["exact_match"]
            run_distill(recipe, self.console)
            run_dir = self.runs / f"opd-{i}"
            self.models[f"student after OPD ({label})"] = run_dir / "final"
            for png in map(Path, plot_run(run_dir)):
                if png.stem == "overlap_ratio":
                    shutil.copyfile(png, self.out / f"opd_{i}_overlap_ratio.png")
            records = read_metrics(run_dir)
            opd = [r for r in records if "opd/overlap_ratio" in r]
            ev = [r for r in records if "eval/arithmetic/exact_match" in r]
            runs[label] = {
                "step": [r["step"] for r in opd],
                "overlap_ratio": [r["opd/overlap_ratio"] for r in opd],
                "eval_step": [0] + [r["step"] for r in ev],
                "exact_match": [before] + [r["eval/arithmetic/exact_match"] for r in ev],
                "overlap_png": f"opd_{i}_overlap_ratio.png",
            }
        for key, png, ylabel in (
            ("exact_match", "opd_accuracy.png", "exact match"),
            ("overlap_ratio", "opd_overlap.png", "top-k overlap"),
        ):
            x = next(iter(runs.values()))["eval_step" if key == "exact_match" else "step"]
            curves(
                self.out / png,
                x,
                {k: v[key] for k, v in runs.items()},
                title=f"OPD: {ylabel}",
                xlabel="OPD step",
                ylabel=ylabel,
            )
        self.report["opd"] = {"teacher_steps": b.teacher_steps, "steps": b.opd_steps, "runs": runs}
        return "; ".join(
            f"OPD from the {k} teacher: exact match {v['exact_match'][0]:.2f} -> {v['exact_match'][-1]:.2f}, "
            f"overlap {v['overlap_ratio'][0]:.2f} -> {v['overlap_ratio'][-1]:.2f}"
            for k, v in runs.items()
        )

    # ----- 5. evaluation -----

    def evaluate_all(self) -> str:
        rows = {}
        for name, source in self.models.items():
            cfg, model = (
                (source.config, source)
                if isinstance(source, nnx.Module)
                else load_any(source, dtype=F32, param_dtype=F32)
            )
            res = evaluate(model, eval_tasks(self.budget), tokenizer=self.tok, batch_size=16)
            kinds = sorted(set(cfg.layer_mixers))
            rows[name] = {
                "mixers": "+".join(kinds) + (" (sparse)" if cfg.sparse_config else ""),
                "params": param_count(cfg),
                "loss": math.log(res["ppl"]["metrics"]["perplexity"]),
                "mqar": res["mqar"]["metrics"]["acc"],
                "passkey": res["passkey"]["metrics"]["acc"],
                "arithmetic": res["arithmetic"]["metrics"]["exact_match"],
            }
        self.report["eval"] = rows
        return f"evaluated {len(rows)} models on held-out loss, MQAR, passkey and arithmetic"

    # ----- 6. export -----

    def export(self) -> str:
        texts = [json.loads(line)["text"] for line in Path(HELD_OUT).read_text().splitlines()[:8]]
        tokens = np.array([self.tok.encode(" ".join(texts), add_bos=True)[:96]], np.int32)  # writable, for torch
        ids = jnp.asarray(tokens)
        diffs = {}
        for name, source in (("hybrid", self.hybrid), ("student", self.models["student after OPD (new capability)"])):
            cfg, model = load_any(source, dtype=F32, param_dtype=F32)
            mine = np.asarray(model(ids))
            official = save_hf_checkpoint(
                model, cfg, self.out / "export" / f"{name}-minicpm", format="minicpm", dtype="float32"
            )
            diffs[f"{name}: minicpm layout, JAX"] = float(
                np.abs(np.asarray(load_hf_checkpoint(official, dtype=F32)[1](ids)) - mine).max()
            )
            if name == "student":
                from minicpm_jax.demo import _torch_diff

                llama = save_hf_checkpoint(
                    model, cfg, self.out / "export" / "student-llama", format="llama", dtype="float32"
                )
                diffs["student: llama layout, PyTorch LlamaForCausalLM"] = _torch_diff(Path(llama), tokens, mine)
        self.report["export"] = {"max_abs_logit_diff": diffs, "tokens": int(ids.shape[1])}
        return "exported and reloaded: " + "; ".join(f"{k} max |logit diff| {v:.1e}" for k, v in diffs.items())


def prefill_seconds(model, length: int, repeats: int = 3) -> float:
    """Median seconds of a jitted forward over a ``[1, length]`` prompt (after one compile call)."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))
    ids = jnp.asarray(np.random.default_rng(0).integers(3, 259, (1, length)), jnp.int32)
    jax.block_until_ready(forward(state, ids))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(forward(state, ids))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def machine() -> dict:
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "platform": f"{platform.system()} {platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__}",
        "device": str(jax.devices()[0].platform),
        "load_average": os.getloadavg()[0],
    }


def run_full_demo(output: Path, overrides: list[str], console: Console, smoke: bool = False) -> dict:
    """Run the full demo into ``output``; returns the report dict (also in ``output/report.json``)."""
    return FullDemo(output, overrides, console, smoke).run()
