"""The accelerator benchmark: one script, one table, one JSON (benchmarks/results/accel_<backend>.json).

Rows (each time is the median of a few runs after a warm-up run, ``jax.block_until_ready``):

- ``dense``: causal GQA attention, 8B shape (B=1, Hq=32, Hkv=2, D=128, bf16): the platform kernel
  (cuDNN on GPU, splash on TPU) vs ``blockwise`` vs the XLA ``reference`` (run only where its
  ``[B,H,T,T]`` fp32 scores fit in half the device memory), fwd and fwd+bwd.
- ``infllm``: InfLLM v2 (spec parameters, always sparse) at the same shape: Pallas vs ``xla``, the
  platform dense kernel on the same inputs, and the block selection alone (its share of the ``xla``
  sparse time); ``flop_limit`` = dense / sparse FLOPs, the most sparse can gain over dense.
- ``lightning``: Lightning attention at SALA's shape (B=1, H=32, D=128, bf16 inputs, fp32 state):
  Pallas vs ``xla``, after an on-device parity check of the kernel (output, state, VJP) vs ``xla``.
- ``mfu``: the MiniCPM4-0.5B train step at 4K, batch 8, bf16 compute (the trainer of
  benchmarks/train.py), remat none (full if that does not fit); target >= 45% on H100/H200.
- ``prefill``: MiniCPM-SALA-9B with 4 layers (1 InfLLM v2 + 3 Lightning, SALA's 25% sparse) vs the
  same 4 layers all dense softmax, 32K-256K tokens (4 layers so that the dense model fits and runs).
- ``decode``: the same two models in the ``minicpm_jax.generate`` engine (greedy, batch 1) after a
  32K prompt: seconds from the first token (prefill done) to the last of 1 + 256 tokens.

FLOPs: causal attention forward ``2 * 2 * B * Hq * T * T * D / 2``; fwd+bwd = 3.5x forward (the
FlashAttention convention: backward = 2.5x forward). InfLLM v2 counts only the selected blocks'
products plus the selection scores (``benchmarks/infllm_v2.py``'s ``flops``). MFU = tokens/s x
``train_flops_per_token`` (6 x matmul params incl. the LM head + 3 x the causal attention forward
``2 * 2 * (T/2) * heads * head_dim`` per layer) / the device's datasheet bf16 peak; "% roofline" is
against a large bf16 matmul timed in the same run. "speedup" = baseline time / row time.

On CPU (or with ``--cpu-smoke``) every row runs at tiny shapes (no Pallas rows: interpret mode would
time nothing useful), about 40 s of CPU time: a test of the script, not a measurement. Any row that
fails (out of memory: "OOM") is recorded and the run goes on.

    python benchmarks/accel.py [--quick] [--only dense,infllm,lightning,mfu,prefill,decode] [--out PATH]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from baselines import matmul_gflops, median_time
from flax import nnx
from infllm_v2 import flops as infllm_flops
from infllm_v2 import targets as infllm_targets
from infllm_v2 import with_grad
from train import Spec, interleaved_medians, make_trainer, markdown, random_rows, timed_step

from minicpm_jax.config import load_config
from minicpm_jax.generate import generate
from minicpm_jax.model.dense_attention import causal_attention
from minicpm_jax.model.factory import create_model
from minicpm_jax.train.flops import peak_flops_per_device, train_flops_per_token
from pallas_kernels.infllm_v2 import InfLLMv2Config, infllm_v2_attention, select_blocks
from pallas_kernels.lightning import alibi_slopes, lightning_attention

HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = ("dense", "infllm", "lightning", "mfu", "prefill", "decode")
# speedups are against the first baseline of the row's kind that ran at the same T and mode
BASELINES = {
    "dense": ("reference", "blockwise"),
    "infllm": ("xla",),
    "lightning": ("xla",),
    "prefill": ("dense",),
    "decode": ("dense",),
}
MFU_TARGET = 0.45  # on H100/H200-class GPUs
FWD_BWD = 3.5


@functools.cache
def settings(smoke: bool, quick: bool) -> dict:
    """Shapes and lengths: the accelerator run, or the CPU smoke test."""
    if smoke:
        return {
            "lengths": [256],
            "prefill_lengths": [128],
            "attn": (4, 2, 32),
            "sparse": InfLLMv2Config(
                kernel_size=8, kernel_stride=4, block_size=16, window_size=32, topk=4, dense_len=-1
            ),
            "mfu": ("tiny-minicpm4", 128, 2, 2),
            "decode": (96, 16),
            "matmul_n": 512,
            "repeats": 3,
        }
    lengths = [4096, 32768, 131072] if quick else [4096, 8192, 16384, 32768, 65536, 131072]
    return {
        "lengths": lengths,
        "prefill_lengths": [32768, 131072] if quick else [32768, 65536, 131072, 262144],
        "attn": (32, 2, 128),
        "sparse": InfLLMv2Config(dense_len=-1),
        "mfu": ("minicpm4-0.5b", 4096, 8, 5),
        "decode": (32768, 256),
        "matmul_n": 8192,
        "repeats": 3,
    }


class Bench:
    """Collects rows, prints a progress line per row, and measures with OOM / failure capture."""

    def __init__(self, repeats: int, roofline: float):
        self.rows, self.repeats, self.roofline, self.start = [], repeats, roofline, time.perf_counter()
        self.parity = {}  # the Lightning kernel's parity vs xla, where it runs

    def guard(self, fn) -> tuple[str, float | None]:
        """``("ok", fn())``, or ``("OOM" | "failed: ...", None)`` if it raises."""
        try:
            return "ok", fn()
        except Exception as e:  # noqa: BLE001 - one failed row must not lose the others
            msg = str(e)
            if "RESOURCE_EXHAUSTED" in msg or "out of memory" in msg.lower():
                return "OOM", None
            return f"failed: {type(e).__name__}: {msg.splitlines()[0][:160] if msg else ''}", None

    def seconds(self, fn, *args) -> tuple[str, float | None]:
        """Median seconds of ``fn(*args)`` after a warm-up call, guarded."""
        return self.guard(lambda: median_time(fn, *args, repeats=self.repeats))

    def add(self, kind, T, mode, impl, status, seconds, flops=None, **extra) -> dict:
        row = dict(kind=kind, T=T, mode=mode, impl=impl, status=status, seconds=seconds, **extra)
        if seconds and flops:
            row.update(tflops=flops / seconds / 1e12, roofline_frac=flops / seconds / self.roofline)
        self.rows.append(row)
        shown = f"{seconds * 1e3:.2f} ms" if seconds else ""
        print(f"[{time.perf_counter() - self.start:7.1f}s] {kind} T={T} {mode} {impl}: {status} {shown}", flush=True)
        return row

    def attention(self, kind, T, impls: dict, args, flops_fwd: dict | None = None):
        """fwd and fwd+bwd of each ``{impl: fn(q, k, v)}``; ``flops_fwd[impl]``: forward FLOPs (fwd+bwd x3.5)."""
        for mode in ("fwd", "fwd+bwd"):
            for impl, fn in impls.items():
                f = jax.jit(fn if mode == "fwd" else with_grad(fn))
                status, s = self.seconds(f, *args)
                flops = (flops_fwd or {}).get(impl)
                self.add(kind, T, mode, impl, status, s, flops and flops * (1 if mode == "fwd" else FWD_BWD))


def qkv(key, t, hq, hkv, d):
    k1, k2, k3 = jax.random.split(jax.random.key(key), 3)
    normal = lambda k, h: jax.random.normal(k, (1, t, h, d), jnp.bfloat16)
    return normal(k1, hq), normal(k2, hkv), normal(k3, hkv)


def platform_dense() -> str:
    return {"gpu": "cudnn", "tpu": "splash"}.get(jax.default_backend(), "blockwise")


def pallas_kernel() -> tuple[str, ...]:
    """The backend's Pallas implementation name (none on CPU: interpret mode measures nothing)."""
    name = {"gpu": "pallas_gpu", "tpu": "pallas_tpu"}.get(jax.default_backend())
    return (name,) if name else ()


def reference_fits(t: int, hq: int) -> bool:
    """Whether the reference's fp32 scores, probabilities and their gradient fit in half the device memory."""
    stats = jax.devices()[0].memory_stats() or {}
    limit = stats.get("bytes_limit")
    return limit is None or 3 * hq * t * t * 4 <= limit / 2


def dense_rows(b: Bench, s: dict):
    hq, hkv, d = s["attn"]
    for t in s["lengths"]:
        impls = [platform_dense(), "blockwise"] + (["reference"] if reference_fits(t, hq) else [])
        fns = {i: functools.partial(causal_attention, implementation=i) for i in dict.fromkeys(impls)}
        flops = 2 * 2 * hq * t * t * d / 2
        b.attention("dense", t, fns, qkv(t, t, hq, hkv, d), dict.fromkeys(fns, flops))
        if "reference" not in fns:
            for mode in ("fwd", "fwd+bwd"):
                b.add("dense", t, mode, "reference", "skipped: scores do not fit", None)


def infllm_rows(b: Bench, s: dict):
    hq, hkv, d = s["attn"]
    cfg = s["sparse"]
    dense = platform_dense()
    for t in s["lengths"]:
        fns = {i: functools.partial(infllm_v2_attention, config=cfg, implementation=i) for i in pallas_kernel()}
        fns["xla"] = functools.partial(infllm_v2_attention, config=cfg, implementation="xla")
        fns[f"dense {dense}"] = functools.partial(causal_attention, implementation=dense)
        f_dense, f_attn, f_sel = infllm_flops(t, hq, d, cfg)
        flops = {i: f_attn + f_sel for i in fns} | {f"dense {dense}": f_dense}
        args = qkv(t, t, hq, hkv, d)
        b.attention("infllm", t, fns, args, flops)
        selection = jax.jit(lambda q, k, v: select_blocks(q, k, cfg))
        b.add("infllm", t, "fwd", "selection", *b.seconds(selection, *args), f_sel)
        for r in b.rows[-2 * len(fns) - 1 :]:
            r["flop_limit"] = f_dense / (f_attn + f_sel)  # the most a sparse path can gain over dense


def lightning_parity(kernel: str, t: int = 1000, d: int = 128) -> dict:
    """Max error / max value of the kernel's output, final state and VJP (bf16 inputs) vs ``xla`` in fp32."""
    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(kk, (2, t, 4, d), jnp.float32).astype(jnp.bfloat16) for kk in keys[:3])
    s0 = jax.random.normal(keys[3], (2, 4, d, d), jnp.float32)
    log_decay = -jnp.asarray(alibi_slopes(32)[::8])

    def run(impl, *xs):
        f = lambda *a: lightning_attention(
            *a[:3], log_decay, initial_state=a[3], return_final_state=True, implementation=impl
        )
        out, vjp = jax.vjp(f, *xs)
        return out, vjp((jnp.ones_like(out[0]), jnp.ones_like(out[1])))

    got = jax.jit(lambda *a: run(kernel, *a))(q, k, v, s0)
    want = jax.jit(lambda *a: run("xla", *a))(*(x.astype(jnp.float32) for x in (q, k, v)), s0)
    errs = [
        float(jnp.max(jnp.abs(a.astype(jnp.float32) - w)) / jnp.max(jnp.abs(w)))
        for a, w in zip(jax.tree.leaves(got), jax.tree.leaves(want))
    ]
    out = dict(zip(["o", "state", "dq", "dk", "dv", "ds0"], errs))
    print(f"parity {kernel} (bf16) vs xla (fp32): " + ", ".join(f"{n} {e:.1e}" for n, e in out.items()), flush=True)
    return out


def lightning_rows(b: Bench, s: dict):
    """Pallas vs ``xla``, after the kernel's on-device parity check vs ``xla`` (fp32), fwd and VJP."""
    h, _, d = s["attn"]
    for kernel in pallas_kernel():
        b.parity[kernel] = b.guard(lambda k=kernel: lightning_parity(k))
    log_decay = -jnp.asarray(alibi_slopes(h))
    for t in s["lengths"]:
        fns = {
            i: functools.partial(lightning_attention, log_decay=log_decay, implementation=i)
            for i in (*pallas_kernel(), "xla")
        }
        b.attention("lightning", t, fns, qkv(t, t, h, h, d))


def mfu_rows(b: Bench, s: dict, peak: float):
    preset, t, batch, steps = s["mfu"]
    flops = batch * t * train_flops_per_token(load_config(preset).model, t)

    def step_seconds(remat: str) -> float:
        cfg, trainer = make_trainer(Spec(preset, preset, remat=remat), steps=steps, dtype="bfloat16")
        data = jax.device_put(random_rows(cfg, batch, t))
        timed_step(trainer, data)  # compile
        return interleaved_medians([(trainer, data)], steps)[0]

    for remat in ("none", "full"):  # full remat only if the plain step does not fit
        status, sec = b.guard(functools.partial(step_seconds, remat))
        extra = {"remat": remat, "batch": batch, "tokens_per_s": sec and batch * t / sec}
        row = b.add("mfu", t, "train step", preset, status, sec, flops, **extra)
        if status == "ok":
            row["mfu"] = flops / sec / peak
            print(f"  MFU {row['mfu']:.1%} of {peak / 1e12:.2f} TFLOP/s (target >= {MFU_TARGET:.0%} on H100/H200)")
            return


@functools.cache
def model_pair(smoke: bool) -> dict:
    """``{"sala": model, "dense": model}``: 4 layers of SALA-9B, 1 InfLLM v2 + 3 Lightning (tiny-sala, 1 + 1, on CPU),
    and the same 4 layers all dense softmax (RoPE, no output gate)."""
    sala = load_config("tiny-sala" if smoke else "minicpm-sala-9b").model
    lightning = 1 if smoke else 3  # the smoke test keeps compile time down with 2 layers
    sala = sala.model_copy(
        update={"num_hidden_layers": 1 + lightning, "mixer_types": ("minicpm4",) + ("lightning-attn",) * lightning}
    )
    dense = sala.model_copy(
        update={"mixer_types": None, "sparse_config": None, "attn_use_rope": True, "attn_use_output_gate": False}
    )
    return {name: create_model(cfg, dtype=jnp.bfloat16) for name, cfg in (("sala", sala), ("dense", dense))}


def prefill_rows(b: Bench, s: dict, smoke: bool):
    for name, model in model_pair(smoke).items():
        graphdef, state = nnx.split(model)
        fn = jax.jit(lambda st, ids, g=graphdef: nnx.merge(g, st).hidden_states(ids))
        for t in s["prefill_lengths"]:
            ids = jnp.asarray(np.random.default_rng(t).integers(0, model.config.vocab_size, (1, t)), jnp.int32)
            b.add("prefill", t, "prefill", name, *b.seconds(fn, state, ids), layers=model.config.num_hidden_layers)


def decode_rows(b: Bench, s: dict, smoke: bool):
    context, new = s["decode"]
    prompt = np.random.default_rng(0).integers(3, 500, context).tolist()
    for name, model in model_pair(smoke).items():

        def decode_seconds(m=model):
            """Seconds from the first token (prefill done) to the last of ``1 + new`` tokens."""
            stamps = []
            on_tokens = lambda *_: stamps.append(time.perf_counter())
            generate(m, [prompt], max_new_tokens=1 + new, on_tokens=on_tokens, stream_every=new)
            return stamps[-1] - stamps[0]

        status, sec = b.guard(lambda: statistics.median([decode_seconds() for _ in range(b.repeats + 1)][1:]))
        per_token = sec and sec / new
        b.add("decode", context, f"{new} tokens", name, status, per_token, tokens_per_s=sec and new / sec)


def add_speedups(rows: list[dict]):
    """``speedup`` = baseline seconds / row seconds; the selection row gets its share of the ``xla`` time."""
    ok = {(r["kind"], r["T"], r["mode"], r["impl"]): r["seconds"] for r in rows if r["status"] == "ok"}
    for r in rows:
        key = (r["kind"], r["T"], r["mode"])
        base = next((i for i in BASELINES.get(r["kind"], ()) if (*key, i) in ok), None)
        if r["status"] != "ok" or not base:
            continue
        if r["impl"] == "selection":
            r["share_of_xla"] = r["seconds"] / ok[(*key, base)]
        else:
            r["baseline"], r["speedup"] = base, ok[(*key, base)] / r["seconds"]


def infllm_target_checks(rows: list[dict]) -> dict:
    """``benchmarks/infllm_v2.py``'s targets (speedup over dense at 32K / 64K, selection share) on the
    forward rows, the sparse time being the fastest sparse implementation's."""
    by_t = {}
    for r in rows:
        if r["kind"] == "infllm" and r["mode"] == "fwd" and r["status"] == "ok":
            by_t.setdefault(r["T"], {})[r["impl"]] = r
    summary = []
    for t, impls in by_t.items():
        dense = next((r["seconds"] for i, r in impls.items() if i.startswith("dense")), None)
        sparse = min((r["seconds"] for i, r in impls.items() if i in ("xla", *pallas_kernel())), default=None)
        if dense and sparse and "selection" in impls:
            share = impls["selection"]["seconds"] / sparse
            limit = impls["selection"]["flop_limit"]
            summary.append(
                {
                    "T": t,
                    "speedup_fwd": dense / sparse,
                    "flop_limit": limit,
                    "selection_share": share,
                    "sparse_fwd_peak_bytes": None,
                }
            )
    return infllm_targets(summary)


def note(r: dict) -> str:
    if "mfu" in r:
        return f"MFU {r['mfu']:.1%} (target >= {MFU_TARGET:.0%})"
    if "share_of_xla" in r:
        return f"{r['share_of_xla']:.0%} of the xla sparse time"
    if "flop_limit" in r:
        return f"FLOP limit {r['flop_limit']:.2f}x"
    if r["kind"] == "decode" and r.get("tokens_per_s"):
        return f"{r['tokens_per_s']:.1f} tok/s"
    return ""


def table(rows: list[dict]) -> str:
    num = lambda x, f: "-" if x is None else f.format(x)
    return markdown(
        rows,
        {
            "row": lambda r: r["kind"],
            "T": lambda r: r["T"],
            "mode": lambda r: r["mode"],
            "impl": lambda r: r["impl"],
            "status": lambda r: r["status"],
            "time ms": lambda r: num(r["seconds"] and r["seconds"] * 1e3, "{:.2f}"),
            "TFLOP/s": lambda r: num(r.get("tflops"), "{:.2f}"),
            "% roofline": lambda r: num(r.get("roofline_frac") and 100 * r["roofline_frac"], "{:.1f}"),
            "speedup": lambda r: num(r.get("speedup"), "{:.2f}x") + (f" vs {r['baseline']}" if "baseline" in r else ""),
            "note": note,
        },
    )


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes (automatic on CPU)")
    p.add_argument("--quick", action="store_true", help="fewer lengths")
    p.add_argument("--only", default=",".join(KINDS), help=f"comma-separated subset of {','.join(KINDS)}")
    p.add_argument("--out", default=None, help="default benchmarks/results/accel_<backend>.json")
    args = p.parse_args(argv)
    only = args.only.split(",")
    if unknown := sorted(set(only) - set(KINDS)):
        p.error(f"--only: unknown {unknown}; expected a subset of {','.join(KINDS)}")
    backend = jax.default_backend()
    smoke = args.cpu_smoke or backend == "cpu"
    s = settings(smoke, args.quick)
    roofline = matmul_gflops(n=s["matmul_n"], dtype=jnp.bfloat16) * 1e9
    peak, peak_source = peak_flops_per_device(), "datasheet bf16 dense"
    if peak is None:
        peak, peak_source = roofline, "measured bf16 matmul (no datasheet peak for this device)"
    kind = jax.devices()[0].device_kind
    print(
        f"backend {backend} ({kind}), {'CPU smoke (tiny shapes, not a measurement)' if smoke else 'full'}; "
        f"peak {peak / 1e12:.1f} TFLOP/s ({peak_source}); measured {s['matmul_n']}^3 bf16 matmul "
        f"{roofline / 1e12:.2f} TFLOP/s",
        flush=True,
    )
    b = Bench(s["repeats"], roofline)
    sections = {
        "dense": lambda: dense_rows(b, s),
        "infllm": lambda: infllm_rows(b, s),
        "lightning": lambda: lightning_rows(b, s),
        "mfu": lambda: mfu_rows(b, s, peak),
        "prefill": lambda: prefill_rows(b, s, smoke),
        "decode": lambda: decode_rows(b, s, smoke),
    }
    for name in KINDS:
        if name in only:
            sections[name]()
    add_speedups(b.rows)
    print(table(b.rows))
    if "infllm" in only:
        print("InfLLM v2 targets:", infllm_target_checks(b.rows))
    result = {
        "backend": backend,
        "device_kind": kind,
        "cpu_smoke": smoke,
        "quick": args.quick,
        "peak_flops": peak,
        "peak_source": peak_source,
        "roofline_flops": roofline,
        "flops_convention": "causal attention fwd 2*2*B*Hq*T*T*D/2; fwd+bwd = 3.5 x fwd; "
        "MFU = tokens/s * train_flops_per_token / peak",
        "mfu_target": MFU_TARGET,
        "lightning_parity_vs_xla": b.parity,
        "infllm_targets": infllm_target_checks(b.rows),
        "rows": b.rows,
        "total_s": time.perf_counter() - b.start,
    }
    out = args.out or os.path.join(HERE, "results", f"accel_{backend}.json")
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(out + ".tmp", out)
    print(f"wrote {out} ({result['total_s']:.0f} s)")


if __name__ == "__main__":
    main()
