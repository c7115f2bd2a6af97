"""``minicpm-jax demo``: the end-to-end tour on a tiny MiniCPM4, printing each step.

Build the model sharded over every local device, run it, export it in both Hugging Face layouts,
reload the official layout in JAX and the Llama layout in PyTorch ``transformers``, compare logits.
"""

from __future__ import annotations

import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from rich.console import Console

from minicpm_jax.config import load_config
from minicpm_jax.info import human_count
from minicpm_jax.interop import load_hf_checkpoint, save_hf_checkpoint
from minicpm_jax.model import create_model, param_count
from minicpm_jax.sharding import make_mesh

DEMO_PRESET = "tiny-minicpm4"


def run_demo(output: Path, overrides: list[str], console: Console) -> dict[str, float]:
    """Run the demo; returns the measured max logit differences."""
    cfg = load_config(DEMO_PRESET, ["dtype=float32", *overrides])
    m = cfg.model
    step = _Steps(console, total=5)
    step(f"config {DEMO_PRESET}: {m.num_hidden_layers} layers, hidden {m.hidden_size}, heads "
         f"{m.num_attention_heads}/{m.num_key_value_heads} kv, vocab {m.vocab_size}, "
         f"{human_count(param_count(m))} parameters, muP scalars emb x{m.scale_emb:g}, "
         f"residual x{m.residual_scale:.4f}, logits / {m.logit_divisor:g}")

    mesh = make_mesh(cfg.mesh)
    model = create_model(m, mesh=mesh, seed=cfg.seed, dtype=jnp.float32)
    ids = np.random.default_rng(cfg.seed).integers(0, m.vocab_size, (2, 32))
    with jax.set_mesh(mesh):
        logits = np.asarray(jax.jit(lambda x: model(x))(jnp.asarray(ids)))
    step(f"built on mesh {dict(mesh.shape)} and ran a jitted forward on {list(ids.shape)} tokens -> "
         f"logits {list(logits.shape)}, all finite: {bool(np.isfinite(logits).all())}")

    official, llama = output / "hf-minicpm", output / "hf-llama"
    save_hf_checkpoint(model, m, official, format="minicpm", dtype="bfloat16")
    step(f"exported the official MiniCPM layout (bf16) -> {official}: {_ls(official)}")
    save_hf_checkpoint(model, m, llama, format="llama", dtype="float32")
    step(f"exported a plain Llama layout (fp32, muP scalars folded in) -> {llama}: {_ls(llama)}")

    _, reloaded = load_hf_checkpoint(official, dtype=jnp.float32)
    jax_diff = float(np.abs(np.asarray(reloaded(jnp.asarray(ids))) - logits).max())
    torch_diff = _torch_diff(llama, ids, logits)
    step(f"reloaded {official.name} in JAX: max |logit diff| {jax_diff:.2e} (bf16 weights); "
         f"reloaded {llama.name} in PyTorch transformers.LlamaForCausalLM: max |logit diff| {torch_diff:.2e}")
    return {"jax_bf16_reload": jax_diff, "torch_llama": torch_diff}


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
        self.console.print(f"[bold cyan][{self.n}/{self.total}][/] {message} "
                           f"[dim]({time.perf_counter() - self.start:.1f}s)[/]", highlight=False)
