"""The training loop: source -> step -> metrics -> eval -> checkpoint, resumable and crash-safe.

Pretraining, conversion and distillation are this loop with a different ``loss_fn``, ``frozen``
state, trainable subset and ``BatchSource``. A new loop is written as::

    def my_loss(model, frozen, batch):            # sums, see train.step
        ...
        return loss_sum, (weight, {"kl": kl_sum})
    run_training(cfg, loss_fn=my_loss, frozen={"teacher": teacher}, source=MySource(...))

(or ``cfg.train.frozen = {"teacher": path}`` so that a resume reloads the teacher itself, and
``cfg.train.trainable`` to train a subset). Everything else — mesh, checkpoints with the source's
state, metrics, evaluation, failure handling — is shared.

Resuming (``train.resume``): ``auto`` refuses a checkpoint whose saved config differs from the new one
in a ``STATE_KEYS`` key (the model, the optimizer's moments, the trainable subset, the master-weight
dtype) and lists the differences; ``force`` resumes anyway (shapes must still fit); ``fresh`` moves the old run's
checkpoints, metrics and outputs into ``previous-<time>/`` and starts at step 0. The mesh, compute
dtype, batch size, learning-rate schedule and ``train.steps`` may change (printed as a note).
SIGTERM / SIGINT save a checkpoint and raise ``TrainingStopped``.

With several processes (``minicpm_jax.distributed``) every process runs this loop on its share of each
batch; a SIGTERM on any host (or a SIGINT, passed on as SIGTERM) stops all of them at the same step
after one checkpoint; process 0 alone writes metrics, progress and moves files.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from minicpm_jax import distributed
from minicpm_jax.ckpt import load_any, save_model
from minicpm_jax.config.schema import Config
from minicpm_jax.data import load_tokenizer, make_eval_batches
from minicpm_jax.data.tokenizer import BYTE_TOKENIZER
from minicpm_jax.model.decoder import MiniCPMForCausalLM
from minicpm_jax.paths import as_path
from minicpm_jax.sharding import make_mesh
from minicpm_jax.train.checkpoint import ResumeError, TrainCheckpointer
from minicpm_jax.train.flops import peak_flops_per_device, train_flops_per_token
from minicpm_jax.train.frozen import load_frozen
from minicpm_jax.train.loss import next_token_loss
from minicpm_jax.train.metrics import MetricsLogger
from minicpm_jax.train.monitor import StepMonitor, TrainingDiverged
from minicpm_jax.train.sources import BatchSource, global_batch
from minicpm_jax.train.state import Trainer, create_trainer
from minicpm_jax.train.step import LossFn, aux_values, check_batch
from minicpm_jax.train.task_rows import training_source

__all__ = ["ResumeError", "TrainingDiverged", "TrainingStopped", "evaluate", "pretrain_loss", "run_training"]

# config keys (dotted prefixes) whose change makes a checkpoint's state mean something else: the model,
# the optimizer's moments and their structure (not the learning-rate schedule, which a resume may change),
# the trainable subset and the master-weight dtype
STATE_KEYS = (
    "model.",
    *(f"optimizer.{k}" for k in ("b1", "b2", "eps", "clip_norm", "mup", "mup_embeddings")),
    *(f"optimizer.{k}" for k in ("decay_embeddings", "decay_norms")),
    "train.trainable",
    "param_dtype",
)
IGNORED_KEYS = ("model.bos_token_id", "model.eos_token_id", "model.pad_token_id", "model.use_cache")
RUN_FILES = ("checkpoints", "metrics.jsonl", "tensorboard", "final", "eval")  # moved aside by resume=fresh


class TrainingStopped(RuntimeError):
    """SIGTERM / SIGINT: a checkpoint was saved at ``step`` and the run stopped before its end."""

    def __init__(self, signum: int, step: int, directory: Path):
        self.signum = signum
        super().__init__(
            f"stopped by {signal.Signals(signum).name} at step {step}: checkpoint saved in {directory} "
            "(rerun the same command to resume)"
        )


def pretrain_loss(cfg: Config) -> LossFn:
    return functools.partial(next_token_loss, remat=cfg.train.remat, chunk_size=cfg.train.loss_chunk_size)


@dataclass
class Run:
    """One run's parts, built by ``prepare_run``."""

    cfg: Config
    trainer: Trainer
    source: BatchSource
    eval_batches: list[dict]
    checkpointer: TrainCheckpointer
    monitor: StepMonitor
    out: Path


def run_training(
    cfg: Config,
    *,
    loss_fn: LossFn | None = None,
    model: MiniCPMForCausalLM | None = None,
    frozen=None,
    trainable=None,
    source: BatchSource | None = None,
    console: Console | None = None,
    devices=None,
) -> dict:
    """Train ``cfg`` (resuming from ``train.output_dir`` if it holds checkpoints); returns a summary.

    ``frozen`` defaults to the models of ``cfg.train.frozen``; ``trainable`` overrides
    ``cfg.train.trainable``; ``source`` defaults to the grain pipeline of ``cfg.data``; ``devices``
    (default all) are the devices of the mesh.
    """
    console = console or Console()
    if not distributed.is_main():
        console = Console(quiet=True)
    run = prepare_run(cfg, loss_fn, model, frozen, trainable, source, console, devices)
    try:
        _restore(run, console)
        return _train(run, console)
    except TrainingDiverged as e:
        run.checkpointer.wait()
        raise TrainingDiverged(f"{e}; {checkpoint_state(run.out / 'checkpoints')}") from None
    finally:
        run.checkpointer.wait()
        run.checkpointer.close()
        run.monitor.logger.close()


def prepare_run(cfg, loss_fn, model, frozen, trainable, source, console, devices=None) -> Run:
    """Checkpointer and metrics first (an unwritable output or a refused resume fails before any compute),
    then mesh (over ``devices``, default all), weights, frozen state, data, trainer and monitor."""
    tc, out = cfg.train, as_path(cfg.train.output_dir)
    if tc.resume == "fresh" and distributed.is_main():
        _move_run_aside(out, console)
    distributed.barrier("minicpm_jax.train.prepare")
    checkpointer, logger = TrainCheckpointer(out / "checkpoints", keep=tc.keep_checkpoints), None
    try:
        logger = MetricsLogger(out, enabled=distributed.is_main())
        mesh = make_mesh(cfg.mesh, devices)
        check_batch(mesh, tc.global_batch_size, tc.micro_batches, cfg.data.seq_len)
        distributed.check_rows(mesh)
        dtypes = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        if model is None and tc.init_from:
            model_cfg, model = load_any(tc.init_from, mesh=mesh, **dtypes)
            if model_cfg != cfg.model:
                console.print(f"[yellow]train.init_from={tc.init_from}: using its model config, not the recipe's[/]")
                cfg = cfg.model_copy(update={"model": model_cfg})
        checkpointer.latest_config(functools.partial(_check_resume, cfg, None))  # refused before any compute
        if frozen is None:
            frozen = load_frozen(tc.frozen, mesh=mesh, dtype=dtypes["dtype"])
        tokenizer = load_tokenizer(cfg.data.tokenizer)
        data_kw = dict(
            tokenizer=tokenizer,
            vocab_size=cfg.model.vocab_size,
            max_position_embeddings=cfg.model.max_position_embeddings,
        )
        if source is None:
            source = training_source(cfg, **data_kw)
        eval_batches = make_eval_batches(cfg.data, batch_size=tc.global_batch_size // tc.micro_batches, **data_kw)
        eval_batches = [distributed.local_rows(b) for b in eval_batches]
        trainer = create_trainer(cfg, mesh, loss_fn or pretrain_loss(cfg), model, frozen=frozen, trainable=trainable)
    except BaseException:
        checkpointer.close()
        if logger is not None:
            logger.close()
        raise
    monitor = StepMonitor(
        logger,
        console,
        max_consecutive_nonfinite=tc.max_consecutive_nonfinite,
        flops_per_token=train_flops_per_token(cfg.model, cfg.data.seq_len),
        peak_flops=peak_flops_per_device(),
    )
    return Run(cfg, trainer, source, eval_batches, checkpointer, monitor, out)


def _restore(run: Run, console: Console) -> None:
    trainer = run.trainer
    abstract = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), trainer.state, trainer.state_sharding
    )
    restored = run.checkpointer.restore_latest(abstract, functools.partial(_check_resume, run.cfg, console))
    start = 0
    if restored is not None:
        start, trainer.state, source_state, _ = restored
        run.source.set_state(distributed.own_state(source_state))
        console.print(f"resumed from {run.out / 'checkpoints'} at step {start}")
    run.monitor.logger.rewind(start)


def config_changes(saved: dict, new: dict) -> dict[str, str]:
    """``{key: "saved -> new"}`` for every leaf key whose value differs between two config dicts."""
    old, cur = _flatten(saved), _flatten(new)
    keys = [k for k in sorted(old.keys() | cur.keys()) if old.get(k) != cur.get(k) and k not in IGNORED_KEYS]
    return {k: f"{old.get(k)!r} -> {cur.get(k)!r}" for k in keys}


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            out |= _flatten(v, f"{prefix}{k}.")
        else:
            out[f"{prefix}{k}"] = v
    return out


def _check_resume(cfg: Config, console: Console | None, step: int, saved: dict) -> None:
    """Refuse (``ResumeError``) a resume whose config changes the state, or whose train.steps is behind it;
    print the accepted differences to ``console`` (if given)."""
    where = f"{cfg.train.output_dir}/checkpoints (step {step})"
    if step > cfg.train.steps:
        raise ResumeError(
            f"train.steps={cfg.train.steps} is below step {step} of the run in {where}; give train.steps >= "
            f"{step} to continue it, or train.resume=fresh to start a new run (the old one is moved aside)"
        )
    changes = config_changes(saved, cfg.model_dump(mode="json"))
    state = "; ".join(f"{k}: {v}" for k, v in changes.items() if k.startswith(STATE_KEYS))
    if state and cfg.train.resume == "auto":
        raise ResumeError(
            f"the run in {where} was made with another config: {state}. Resume with the same config, or set "
            "train.resume=force (resume anyway) or train.resume=fresh (start again; the old run is moved aside)"
        )
    other = "; ".join(f"{k}: {v}" for k, v in changes.items() if not k.startswith(STATE_KEYS))
    if console is not None and state:
        console.print(f"[yellow]train.resume=force: resuming despite {state}[/]")
    if console is not None and other:
        console.print(f"[dim]resuming with {other}[/]")


def _move_run_aside(out: Path, console: Console) -> None:
    """``train.resume=fresh``: move an earlier run's files into ``out/previous-<time>/`` (nothing deleted)."""
    found = [out / name for name in RUN_FILES if (out / name).exists()]
    if found:
        aside = out / time.strftime("previous-%Y%m%d-%H%M%S")
        aside.mkdir()
        for path in found:
            path.rename(aside / path.name)
        console.print(f"train.resume=fresh: moved {', '.join(p.name for p in found)} to {aside}")


def checkpoint_state(directory: Path) -> str:
    """What a rerun would resume from: the newest finished checkpoint, or that there is none."""
    steps = sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []
    if not steps:
        return f"no checkpoint was saved in {directory}: a rerun starts from step 0"
    return f"the newest checkpoint is step {steps[-1]} in {directory}: a rerun resumes from it"


def _train(run: Run, console: Console) -> dict:
    cfg, tc, trainer, monitor = run.cfg, run.cfg.train, run.trainer, run.monitor
    start = int(trainer.state["step"])
    stop = {"signal": None}
    with _stop_on_signals(stop), _progress(console) as progress:
        task = progress.add_task("train", total=tc.steps, completed=start, loss=float("nan"), aux="")
        for step in range(start + 1, tc.steps + 1):
            batch = global_batch(trainer.mesh, run.source.next_batch(step, trainer))
            monitor.push(step, trainer.step(batch), batch["input_ids"].size if "input_ids" in batch else 0)
            if distributed.preempted(step):
                stop["signal"] = signal.SIGTERM
            last = step == tc.steps or stop["signal"]
            evaluate_now = (run.eval_batches or tc.eval_tasks) and tc.eval_every and step % tc.eval_every == 0
            evaluate_now = evaluate_now and step != tc.steps  # the last step is evaluated after the loop
            checkpoint_now = step % tc.checkpoint_every == 0 or last
            if step % tc.log_every == 0 or last or evaluate_now or checkpoint_now:
                values = monitor.flush()
                if values:
                    progress.update(task, loss=values["loss"], aux=values["aux_summary"])
            progress.update(task, completed=step)
            if evaluate_now:
                monitor.logger.log(step, _evaluations(run, step))
            if checkpoint_now:
                state = distributed.gather_states(run.source.get_state())
                run.checkpointer.save(step, trainer.state, state, cfg.model_dump(mode="json"), force=True)
            if stop["signal"]:
                break
    run.checkpointer.wait()
    if stop["signal"]:
        raise TrainingStopped(stop["signal"], int(trainer.state["step"]), run.out / "checkpoints")
    losses = monitor.losses
    summary = {
        "steps": int(trainer.state["step"]),
        "skipped_steps": int(trainer.state["skipped"]),
        "first_loss": losses[0] if losses else None,
        "last_loss": losses[-1] if losses else None,
    }
    if run.eval_batches or tc.eval_tasks:
        results = _evaluations(run, summary["steps"])
        summary.update(results)
        monitor.logger.log(summary["steps"], results)
    if summary["steps"] == tc.steps:
        tokenizer = cfg.data.tokenizer or BYTE_TOKENIZER
        save_model(trainer.model(), cfg.model, run.out / "final", tokenizer_source=tokenizer)
    return summary


def evaluate(trainer: Trainer, batches: list[dict]) -> dict[str, float]:
    """Held-out ``eval_loss`` (token-weighted mean) and ``eval_<aux>`` for every aux metric of the loss."""
    total = weight = 0.0
    parts: dict = {}
    for local in batches:
        s, w, aux = jax.device_get(trainer.evaluate_batch(global_batch(trainer.mesh, local)))
        total, weight = total + float(s), weight + float(w)
        parts = aux if not parts else jax.tree.map(lambda a, b: a + b, parts, aux)
    return {"eval_loss": total / max(weight, 1.0), **{f"eval_{k}": float(v) for k, v in aux_values(parts).items()}}


def _evaluations(run: Run, step: int) -> dict[str, float]:
    """Held-out loss (``evaluate``) and the ``train.eval_tasks`` metrics as ``eval/<label>/<metric>``."""
    results = evaluate(run.trainer, run.eval_batches) if run.eval_batches else {}
    if run.cfg.train.eval_tasks:
        from minicpm_jax.eval import evaluate as evaluate_tasks

        tasks = evaluate_tasks(
            run.trainer.model(),
            run.cfg.train.eval_tasks,
            tokenizer=load_tokenizer(run.cfg.data.tokenizer),
            seed=run.cfg.seed,
            output_dir=run.out / "eval" / f"step-{step}",
        )
        results.update({f"eval/{label}/{k}": v for label, r in tasks.items() for k, v in r["metrics"].items()})
    return results


@contextlib.contextmanager
def _stop_on_signals(stop: dict):
    """SIGTERM / SIGINT set ``stop['signal']``; the loop checkpoints and exits after the current step.
    With several processes SIGTERM is left to JAX's preemption service (``distributed.preempted``), and
    SIGINT is passed on to it as a SIGTERM."""

    def handler(signum, _frame):
        stop["signal"] = signum

    def to_sigterm(_signum, _frame):
        os.kill(os.getpid(), signal.SIGTERM)

    if distributed.multiprocess():
        previous = {signal.SIGINT: signal.signal(signal.SIGINT, to_sigterm)}
    else:
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
        TextColumn("{task.fields[aux]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
