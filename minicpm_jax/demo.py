"""``minicpm-jax demo``: the end-to-end tour on a tiny MiniCPM4, printing each step.

Pretrain the tiny model on the built-in synthetic corpus (``configs/recipes/pretrain-tiny.yaml``)
and watch the loss fall; reload the final checkpoint and score held-out text; export it in both
Hugging Face layouts; reload the official layout in JAX and the Llama layout in PyTorch
``transformers`` and compare logits; generate from the exported checkpoint with its tokenizer.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from rich.console import Console

from minicpm_jax.ckpt import load_model
from minicpm_jax.config import CONFIG_DIR, load_recipe
from minicpm_jax.data import load_tokenizer, make_eval_batches
from minicpm_jax.generate import generate
from minicpm_jax.info import human_count
from minicpm_jax.interop import load_hf_checkpoint, save_hf_checkpoint
from minicpm_jax.model import param_count
from minicpm_jax.train.loop import run_training

DEMO_RECIPE = CONFIG_DIR / "recipes" / "pretrain-tiny.yaml"
DEMO_PROMPTS = ("27+48:", "copy: jax on tpu ->", "35*12:")


def run_demo(output: Path, overrides: list[str], console: Console) -> dict[str, float]:
    """Run the demo; returns the measured numbers."""
    run_dir = output / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # the demo always starts from scratch
    cfg = load_recipe(DEMO_RECIPE, [f"train.output_dir={run_dir}", *overrides])
    m = cfg.model
    step = _Steps(console, total=6)
    step(
        f"recipe {DEMO_RECIPE.name}: tiny MiniCPM4 ({m.num_hidden_layers} layers, hidden {m.hidden_size}, "
        f"{human_count(param_count(m))} parameters, muP scalars emb x{m.scale_emb:g}, residual "
        f"x{m.residual_scale:.4f}, logits / {m.logit_divisor:g}) on the synthetic corpus "
        f"{list(cfg.data.synthetic_tasks)}, {cfg.train.steps} steps of {cfg.train.global_batch_size} x "
        f"{cfg.data.seq_len} tokens, {cfg.optimizer.schedule} schedule"
    )
    summary = run_training(cfg, console=console)
    step(
        f"pretrained: loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f}, held-out loss "
        f"{summary['eval_loss']:.3f}; final checkpoint {run_dir / 'final'}"
    )

    _, model = load_model(run_dir / "final", dtype=jnp.float32)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    batch = make_eval_batches(
        cfg.data,
        tokenizer=tokenizer,
        batch_size=4,
        vocab_size=m.vocab_size,
        max_position_embeddings=m.max_position_embeddings,
    )[0]
    ids = batch["input_ids"]
    logits = np.asarray(model(jnp.asarray(ids), jnp.asarray(batch["positions"]), jnp.asarray(batch["segment_ids"])))
    mask = batch["loss_mask"] > 0
    accuracy = float(np.mean(np.argmax(logits, -1)[mask] == batch["targets"][mask]))
    step(
        f"reloaded it: next-token accuracy on held-out documents {accuracy:.1%}; sample: "
        f"{tokenizer.decode(ids[0][: int(np.argmax(batch['segment_ids'][0] > 1) or 60)].tolist())!r}"
    )

    official, llama = output / "hf-minicpm", output / "hf-llama"
    save_hf_checkpoint(model, m, official, format="minicpm", dtype="bfloat16", tokenizer_dir=run_dir / "final")
    save_hf_checkpoint(model, m, llama, format="llama", dtype="float32")
    step(
        f"exported the official MiniCPM layout (bf16) -> {official} and a plain Llama layout (fp32, muP "
        f"scalars folded in) -> {llama}: {_ls(llama)}"
    )

    plain = np.asarray(model(jnp.asarray(ids)))
    _, reloaded = load_hf_checkpoint(official, dtype=jnp.float32)
    jax_diff = float(np.abs(np.asarray(reloaded(jnp.asarray(ids))) - plain).max())
    torch_diff = _torch_diff(llama, ids, plain)
    step(
        f"reloaded {official.name} in JAX: max |logit diff| {jax_diff:.2e} (bf16 weights); reloaded "
        f"{llama.name} in PyTorch transformers.LlamaForCausalLM: max |logit diff| {torch_diff:.2e}"
    )
    hf_tokenizer = load_tokenizer(official)
    prompts = [hf_tokenizer.encode(p, add_bos=True) for p in DEMO_PROMPTS]
    out = generate(reloaded, prompts, max_new_tokens=48, stop_token_ids=hf_tokenizer.stop_ids)
    completions = [hf_tokenizer.decode(out.row_tokens(i)) for i in range(len(prompts))]
    step(
        f"generated from {official.name} with its tokenizer (greedy, one batch of {len(prompts)} prompts): "
        + "; ".join(f"{p!r} -> {c!r}" for p, c in zip(DEMO_PROMPTS, completions))
    )
    return {
        "first_loss": summary["first_loss"],
        "last_loss": summary["last_loss"],
        "eval_loss": summary["eval_loss"],
        "accuracy": accuracy,
        "jax_bf16_reload": jax_diff,
        "torch_llama": torch_diff,
    }


def _torch_diff(directory: Path, ids: np.ndarray, logits: np.ndarray) -> float:
    try:
        import torch
        import transformers
    except ImportError as e:
        raise RuntimeError("the demo's last step needs PyTorch: pip install -e '.[test]'") from e
    model = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.as_tensor(ids)).logits.numpy()
    return float(np.abs(theirs - logits).max())


def _ls(directory: Path) -> str:
    return ", ".join(sorted(p.name for p in directory.iterdir()))


class _Steps:
    def __init__(self, console: Console, total: int):
        self.console, self.total, self.n, self.start = console, total, 0, time.perf_counter()

    def __call__(self, message: str) -> None:
        self.n += 1
        self.console.print(
            f"[bold cyan][{self.n}/{self.total}][/] {message} [dim]({time.perf_counter() - self.start:.1f}s)[/]",
            highlight=False,
        )
