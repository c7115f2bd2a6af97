"""The training loop: data -> jitted step -> metrics / evaluation / checkpoints, resumable and crash-safe.

Pretraining, conversion and distillation call ``run_training`` with their own ``loss_fn`` (and model);
everything else — mesh, data, checkpoints, metrics, failure handling — is shared.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from minicpm_jax.ckpt import BYTE_TOKENIZER, load_any, save_model
from minicpm_jax.config.schema import Config
from minicpm_jax.data import build_tokenizer, make_eval_batches, make_train_iterator
from minicpm_jax.model.decoder import MiniCPMForCausalLM
from minicpm_jax.sharding import make_mesh
from minicpm_jax.train.checkpoint import TrainCheckpointer
from minicpm_jax.train.flops import peak_flops_per_device, train_flops_per_token
from minicpm_jax.train.loss import next_token_loss
from minicpm_jax.train.metrics import MetricsLogger
from minicpm_jax.train.state import Trainer, create_trainer
from minicpm_jax.train.step import LossFn, batch_sharding, check_batch


class TrainingDiverged(RuntimeError):
    """Too many consecutive non-finite steps."""


def pretrain_loss(cfg: Config) -> LossFn:
    return functools.partial(next_token_loss, remat=cfg.train.remat, chunk_size=cfg.train.loss_chunk_size)


def run_training(
    cfg: Config,
    *,
    loss_fn: LossFn | None = None,
    model: MiniCPMForCausalLM | None = None,
    console: Console | None = None,
) -> dict:
    """Train ``cfg`` (resuming from ``train.output_dir`` if it holds checkpoints); returns a summary."""
    console = console or Console()
    tc, out = cfg.train, Path(cfg.train.output_dir)
    mesh = make_mesh(cfg.mesh)
    check_batch(mesh, tc.global_batch_size, tc.micro_batches, cfg.data.seq_len)
    if model is None and tc.init_from:
        model_cfg, model = load_any(
            tc.init_from, mesh=mesh, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype)
        )
        if model_cfg != cfg.model:
            console.print(f"[yellow]train.init_from={tc.init_from}: using its model config, not the recipe's[/]")
            cfg = cfg.model_copy(update={"model": model_cfg})
    tokenizer = build_tokenizer(cfg.data.tokenizer)
    data_kw = dict(
        tokenizer=tokenizer, vocab_size=cfg.model.vocab_size, max_position_embeddings=cfg.model.max_position_embeddings
    )
    data = make_train_iterator(
        cfg.data,
        global_batch_size=tc.global_batch_size,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        **data_kw,
    )
    eval_batches = make_eval_batches(cfg.data, batch_size=tc.global_batch_size // tc.micro_batches, **data_kw)
    trainer = create_trainer(cfg, mesh, loss_fn or pretrain_loss(cfg), model)
    checkpointer = TrainCheckpointer(out / "checkpoints", keep=tc.keep_checkpoints)
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), trainer.state, trainer.state_sharding
    )
    restored = checkpointer.restore_latest(abstract)
    if restored is not None:
        start, trainer.state, data_state, _ = restored
        data.set_state(data_state)
        console.print(f"resumed from {out / 'checkpoints'} at step {start}")
    start = int(trainer.state["step"])
    flops_per_token = train_flops_per_token(cfg.model, cfg.data.seq_len)
    peak = peak_flops_per_device()
    logger = MetricsLogger(out)
    rows = batch_sharding(mesh)
    stop = {"signal": None}
    skipped = consecutive = 0
    losses = []
    try:
        with _stop_on_signals(stop), _progress(console) as progress:
            task = progress.add_task("train", total=tc.steps, completed=start, loss=float("nan"))
            tick = time.perf_counter()
            for step in range(start + 1, tc.steps + 1):
                local = next(data)
                batch = {k: jax.make_array_from_process_local_data(rows, v) for k, v in local.items()}
                trainer.state, metrics = trainer.train_step(trainer.state, batch)
                if not bool(metrics["finite"]):
                    skipped, consecutive = skipped + 1, consecutive + 1
                    console.print(
                        f"[yellow]step {step}: non-finite loss/gradient, update skipped "
                        f"({consecutive} in a row, {skipped} total)[/]"
                    )
                    if consecutive >= tc.max_consecutive_nonfinite:
                        raise TrainingDiverged(
                            f"{consecutive} consecutive non-finite steps (train.max_consecutive_nonfinite="
                            f"{tc.max_consecutive_nonfinite}) at step {step}; stopping. The last good "
                            f"checkpoint is kept in {out / 'checkpoints'}"
                        )
                else:
                    consecutive = 0
                    losses.append(float(metrics["loss"]))
                progress.update(task, completed=step, loss=float(metrics["loss"]))
                if step % tc.log_every == 0 or step == tc.steps:
                    now = time.perf_counter()
                    tokens_per_s = tc.log_every * local["input_ids"].size * jax.process_count() / (now - tick)
                    tick = now
                    mfu = tokens_per_s * flops_per_token / (peak * jax.device_count()) if peak else None
                    logger.log(
                        step,
                        {
                            "loss": metrics["loss"],
                            "grad_norm": metrics["grad_norm"],
                            "learning_rate": metrics["learning_rate"],
                            "tokens_per_s": tokens_per_s,
                            "mfu": mfu,
                            "skipped_steps": skipped,
                        },
                    )
                if eval_batches and tc.eval_every and step % tc.eval_every == 0:
                    logger.log(step, {"eval_loss": evaluate(trainer, eval_batches)})
                if step % tc.checkpoint_every == 0 or step == tc.steps or stop["signal"]:
                    checkpointer.save(step, trainer.state, data.get_state(), cfg.model_dump(mode="json"), force=True)
                if stop["signal"]:
                    console.print(f"received {stop['signal']}: checkpoint saved at step {step}, stopping")
                    break
        checkpointer.wait()
        summary = {
            "steps": int(trainer.state["step"]),
            "skipped_steps": skipped,
            "first_loss": losses[0] if losses else None,
            "last_loss": losses[-1] if losses else None,
        }
        if eval_batches:
            summary["eval_loss"] = evaluate(trainer, eval_batches)
            logger.log(summary["steps"], {"eval_loss": summary["eval_loss"]})
        if summary["steps"] == tc.steps:
            save_model(trainer.model(), cfg.model, out / "final", tokenizer_source=cfg.data.tokenizer or BYTE_TOKENIZER)
        return summary
    finally:
        checkpointer.wait()
        checkpointer.close()
        logger.close()


def evaluate(trainer: Trainer, batches: list[dict]) -> float:
    """Token-weighted mean loss over held-out batches."""
    rows = batch_sharding(trainer.mesh)
    total = weight = 0.0
    for local in batches:
        batch = {k: jax.make_array_from_process_local_data(rows, v) for k, v in local.items()}
        s, w = trainer.eval_step(trainer.state["params"], batch)
        total, weight = total + float(s), weight + float(w)
    return total / max(weight, 1.0)


@contextlib.contextmanager
def _stop_on_signals(stop: dict):
    """SIGTERM / SIGINT set ``stop['signal']``; the loop checkpoints and exits after the current step."""

    def handler(signum, _frame):
        stop["signal"] = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
