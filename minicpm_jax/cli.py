"""The ``minicpm-jax`` command line: demo, train, generate, eval, info, import-hf, export-hf.

Every command takes ``section.key=value`` overrides of the run config (``mesh.fsdp=4``,
``dtype=float32``, and for ``info`` also ``model.num_hidden_layers=4``).

Expected failures (bad configs and inputs, unreadable files, full or read-only disks, existing
outputs) print one ``error: ...`` line on stderr; ``--debug`` shows the traceback instead. Exit codes
are in ``EXIT_CODES``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import jax
import yaml
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from minicpm_jax import distributed
from minicpm_jax.config import ConfigError, build_config, load_config
from minicpm_jax.config.loading import apply_overrides
from minicpm_jax.paths import as_path
from minicpm_jax.safety import check_output, check_recipe_file, check_run_dir, jsonl_output, writing
from minicpm_jax.sharding import mesh_shape

console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)

EXIT_CODES = {
    0: "success",
    1: "unexpected internal error (a traceback; please report it)",
    2: "user error: bad config, argument or input file, existing output, refused resume, disk full / read-only",
    3: "training diverged (train.max_consecutive_nonfinite non-finite steps in a row)",
    128 + signal.SIGINT: "stopped by SIGINT after saving a checkpoint (rerun to resume)",
    128 + signal.SIGTERM: "stopped by SIGTERM after saving a checkpoint (rerun to resume)",
}


def _run_config(overrides):
    """Root config for commands whose model comes from a checkpoint (model keys are not accepted)."""
    if any(o.startswith("model.") for o in overrides):
        raise ConfigError(
            [
                (
                    "model.*: this command takes the model from its checkpoint; "
                    "only mesh.*, dtype, param_dtype and seed can be overridden"
                )
            ]
        )
    return build_config(apply_overrides({}, overrides))


def cmd_info(args) -> None:
    from minicpm_jax.info import human_bytes, human_count, model_info

    cfg = load_config(args.model, args.overrides)
    info = model_info(cfg, args.devices or jax.device_count())
    m = cfg.model
    kinds = {k: m.layer_mixers.count(k) for k in dict.fromkeys(m.layer_mixers)}
    console.print(
        f"[bold]{args.model}[/]: {human_count(info.params)} parameters ({info.params:,}); "
        f"non-embedding {human_count(info.params - info.embedding_params)}"
        + (
            f"; trainable {human_count(info.trainable_params)} ({', '.join(cfg.train.trainable)})"
            if cfg.train.trainable
            else ""
        )
    )
    console.print(
        f"layers {m.num_hidden_layers} {kinds}, hidden {m.hidden_size}, heads {m.num_attention_heads}"
        f"x{m.attn_head_dim} (kv {m.num_key_value_heads}), ffn {m.intermediate_size}, vocab "
        f"{m.vocab_size}, {'tied' if m.tie_word_embeddings else 'untied'} head"
        + (", InfLLM v2 sparse" if m.sparse_config else "")
    )
    table = Table(title=f"per device on mesh {info.mesh} ({args.devices or jax.device_count()} devices)")
    for col in (
        "parameters",
        f"params ({cfg.param_dtype})",
        f"gradients ({cfg.param_dtype})",
        "AdamW m+v (fp32)",
        "total",
    ):
        table.add_column(col, justify="right")
    total = info.param_bytes + info.grad_bytes + info.optimizer_bytes
    table.add_row(
        human_count(info.params_per_device),
        human_bytes(info.param_bytes),
        human_bytes(info.grad_bytes),
        human_bytes(info.optimizer_bytes),
        human_bytes(total),
    )
    console.print(table)
    if args.train_plan:
        _print_train_plan(cfg, args)


def _plan_meshes(args):
    from minicpm_jax.config import MeshConfig

    try:
        meshes = [
            MeshConfig(**{k.strip(): int(v) for k, v in (kv.split("=") for kv in spec.split(","))})
            for spec in args.plan_meshes.split(";")
        ]
        return meshes, [int(b) for b in args.plan_batch_sizes.split(",")]
    except ValueError:  # also pydantic's ValidationError (an unknown axis)
        raise ValueError(
            f"--plan-meshes {args.plan_meshes!r} / --plan-batch-sizes {args.plan_batch_sizes!r}: expected "
            "'fsdp=8;fsdp=4,tensor=2' (axes data, fsdp, tensor, sequence) and '8,16'"
        ) from None


def _print_train_plan(cfg, args) -> None:
    from minicpm_jax.train.plan import plan_train_memory

    meshes, batch_sizes = _plan_meshes(args)
    rows = [("", row) for row in plan_train_memory(cfg, meshes, batch_sizes, args.plan_seq_len)]
    _print_plan_rows(f"remat={cfg.train.remat}, micro_batches={cfg.train.micro_batches}, compute {cfg.dtype}", rows)


def _print_plan_rows(what: str, rows) -> None:
    """A table of ``(label, train.plan.PlanRow)`` rows (the label column only when labels are given)."""
    from minicpm_jax.info import human_bytes

    table = Table(
        title="train step memory per device (XLA memory_analysis; resident = params + optimizer + "
        f"batch + frozen models, temp = activations + scratch; {what})"
    )
    labelled = any(label for label, _ in rows)
    for col in ("stage",) * labelled + ("mesh", "batch x seq", "resident", "temp", "total", "compile s"):
        table.add_column(col, justify="right", no_wrap=True)
    for label, row in rows:
        mesh = ",".join(f"{k}={v}" for k, v in row.mesh.items() if v > 1) or "1 device"
        table.add_row(
            *(label,) * labelled,
            mesh,
            f"{row.batch_size} x {row.seq_len}",
            human_bytes(row.argument_bytes),
            human_bytes(row.temp_bytes),
            human_bytes(row.total_bytes),
            f"{row.compile_seconds:.0f}",
        )
    console.print(table)


def cmd_import_hf(args) -> None:
    from minicpm_jax.ckpt import load_hf, save_model
    from minicpm_jax.data.tokenizer import has_tokenizer
    from minicpm_jax.sharding import make_mesh

    cfg = _run_config(args.overrides)
    check_output(args.output, overwrite=args.overwrite, sources=[args.hf_dir])
    distributed.barrier("minicpm_jax.cli.checked")
    start = time.perf_counter()
    model_cfg, model = load_hf(args.hf_dir, mesh=make_mesh(cfg.mesh), param_dtype=cfg.param_dtype)
    with writing(args.output):
        out = save_model(
            model, model_cfg, args.output, tokenizer_source=args.hf_dir if has_tokenizer(args.hf_dir) else None
        )
    console.print(
        f"imported {args.hf_dir} ({model_cfg.model_type}, {model_cfg.num_hidden_layers} layers) "
        f"-> {out} in {time.perf_counter() - start:.1f}s"
    )


def cmd_export_hf(args) -> None:
    from minicpm_jax.ckpt import load_any
    from minicpm_jax.data.tokenizer import has_tokenizer
    from minicpm_jax.interop import save_hf_checkpoint
    from minicpm_jax.sharding import make_mesh

    cfg = _run_config(args.overrides)
    check_output(args.output, overwrite=args.overwrite, sources=[args.source, args.tokenizer])
    start = time.perf_counter()
    model_cfg, model = load_any(args.source, mesh=make_mesh(cfg.mesh), param_dtype=cfg.param_dtype, seed=cfg.seed)
    with writing(args.output):
        out = save_hf_checkpoint(
            model,
            model_cfg,
            args.output,
            format=args.format,
            dtype=args.dtype,
            tokenizer_dir=args.tokenizer or (args.source if has_tokenizer(args.source) else None),
            max_shard_bytes=int(args.max_shard_gb * 2**30),
        )
    files = sorted(p.name for p in out.iterdir())
    console.print(
        f"exported {args.source} as format={args.format} ({args.dtype}) -> {out} "
        f"in {time.perf_counter() - start:.1f}s: {', '.join(files)}"
    )


def cmd_train(args) -> None:
    from minicpm_jax.config import load_recipe
    from minicpm_jax.info import human_count
    from minicpm_jax.model import param_count
    from minicpm_jax.train.loop import run_training

    cfg = load_recipe(check_recipe_file(args.config), args.overrides)
    console.rule("resolved config")
    console.print(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, width=120).rstrip(), highlight=False)
    mesh = mesh_shape(cfg.mesh, jax.device_count())
    console.print(
        f"mesh {mesh} over {jax.device_count()} {jax.devices()[0].platform} device(s); model "
        f"{human_count(param_count(cfg.model))} parameters; {cfg.train.steps} steps of "
        f"{cfg.train.global_batch_size} x {cfg.data.seq_len} tokens"
    )
    summary = run_training(cfg, console=console)
    console.print(f"done: {summary}")


def cmd_convert(args) -> None:
    from minicpm_jax.convert import load_convert_recipe, run_conversion

    recipe = load_convert_recipe(check_recipe_file(args.config), args.overrides)
    if not args.plan:
        check_run_dir(recipe.output_dir, args.overwrite, "convert", [recipe.teacher])
    distributed.barrier("minicpm_jax.cli.checked")  # every host checked the output before any writes
    console.rule("resolved conversion recipe")
    console.print(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, width=120).rstrip(), highlight=False)
    if args.plan:
        from minicpm_jax.convert.plan import plan_conversion

        meshes, batch_sizes = _plan_meshes(args)
        _print_plan_rows(
            f"compute {recipe.dtype}, teacher {recipe.teacher}", plan_conversion(recipe, meshes, batch_sizes)
        )
        return
    summary = run_conversion(recipe, console)
    console.print(f"done: final hybrid {summary['final']}; mixer_types {summary['mixer_types']}")


def cmd_distill(args) -> None:
    words = [w for w in args.words if "=" not in w]
    args.overrides = [w for w in args.words if "=" in w] + args.overrides
    if words:
        from minicpm_jax.distill.plots import plot_run

        if words[0] != "plot" or len(words) != 2:
            raise ValueError(f"distill: unexpected {' '.join(words)!r} (minicpm-jax distill plot RUN_DIR)")
        for path in plot_run(words[1]):
            console.print(f"wrote {path}")
        return
    if not args.config:
        raise ValueError("distill: give --config RECIPE (or: minicpm-jax distill plot RUN_DIR)")
    from minicpm_jax.distill import load_distill_recipe, run_distill

    recipe = load_distill_recipe(check_recipe_file(args.config), args.overrides)
    if not args.plan:
        check_run_dir(recipe.output_dir, args.overwrite, "distill", [recipe.student, recipe.teacher])
    distributed.barrier("minicpm_jax.cli.checked")
    console.rule("resolved distillation recipe")
    console.print(yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, width=120).rstrip(), highlight=False)
    if args.plan:
        from minicpm_jax.distill.plan import plan_distill

        meshes, batch_sizes = _plan_meshes(args)
        rows = [("", row) for row in plan_distill(recipe, meshes, batch_sizes)]
        _print_plan_rows(f"student {recipe.student}, teacher {recipe.teacher}, loss {recipe.loss.loss}", rows)
        return
    summary = run_distill(recipe, console)
    console.print(f"done: {summary}")


def cmd_generate(args) -> None:
    import jax.numpy as jnp

    from minicpm_jax.ckpt import load_any
    from minicpm_jax.data.tokenizer import check_vocab, load_tokenizer
    from minicpm_jax.generate.requests import build_requests, generation_defaults, read_jsonl, run_requests
    from minicpm_jax.sharding import make_mesh

    cfg = _run_config(args.overrides)
    if args.output:
        check_output(args.output, overwrite=args.overwrite, sources=[args.checkpoint, args.input, args.tokenizer])
    distributed.barrier("minicpm_jax.cli.checked")
    tokenizer_dir = args.tokenizer or args.checkpoint
    tokenizer = load_tokenizer(tokenizer_dir)
    chat = tokenizer.chat_template is not None if args.chat is None else args.chat
    if args.input:
        records = read_jsonl(args.input)
    else:
        records = [{"prompt": p} for p in args.prompt]
    cli_sampling = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")}
    defaults = generation_defaults(tokenizer_dir) | {k: v for k, v in cli_sampling.items() if v is not None}
    mesh = make_mesh(cfg.mesh) if any(o.startswith("mesh.") for o in args.overrides) else None
    dtype = jnp.dtype(args.dtype or cfg.dtype)
    model_cfg, model = load_any(args.checkpoint, mesh=mesh, dtype=dtype, param_dtype=cfg.param_dtype, seed=cfg.seed)
    check_vocab(tokenizer, model_cfg.vocab_size, where=f"tokenizer of {tokenizer_dir} (--tokenizer DIR)")
    requests = build_requests(
        records,
        tokenizer,
        chat=chat,
        defaults=defaults,
        max_new_tokens=args.max_new_tokens,
        context=model_cfg.max_position_embeddings,
        vocab_size=model_cfg.vocab_size,
    )
    stream = args.output is None and len(requests) == 1 and distributed.is_main()
    on_text = (lambda text: (sys.stdout.write(text), sys.stdout.flush())) if stream else None
    start = time.perf_counter()
    if args.output:  # opened (and its disk checked) before generating; every process generates, process 0 writes
        with jsonl_output(as_path(args.output)) if distributed.is_main() else open(os.devnull, "w") as f:
            for record in run_requests(model, tokenizer, requests, batch_size=args.batch_size, seed=args.seed):
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        console.print(f"{len(requests)} completions -> {args.output} in {time.perf_counter() - start:.1f}s")
        return
    records_out = run_requests(model, tokenizer, requests, batch_size=args.batch_size, seed=args.seed, on_text=on_text)
    for record in records_out:
        if not stream:
            console.rule(f"id {record['id']}")
            console.print(record["completion"], markup=False, highlight=False)
        else:
            sys.stdout.write("\n")
        console.print(
            f"[dim]finish_reason={record['finish_reason']}, {len(record['token_ids'])} tokens, "
            f"{record['prompt_tokens']} prompt tokens[/]"
        )


def cmd_eval(args) -> None:
    from minicpm_jax.eval.command import run_eval

    run_eval(args, console)


def cmd_demo(args) -> None:
    if args.smoke and not args.full:
        raise ValueError("demo: --smoke goes with --full (minicpm-jax demo --full --smoke)")
    if args.full:
        from minicpm_jax.demo_full import run_full_demo

        run_full_demo(Path(args.output or "outputs/demo-full"), args.overrides, console, smoke=args.smoke)
        return
    from minicpm_jax.demo import run_demo

    run_demo(Path(args.output or "outputs/demo"), args.overrides, console)


def _add_plan_arguments(p) -> None:
    p.add_argument(
        "--plan-meshes", default="fsdp=8;fsdp=4,tensor=2;data=2,fsdp=4", help="meshes of a memory plan, ';'-separated"
    )
    p.add_argument("--plan-batch-sizes", default="8,16", help="global batch sizes of a memory plan")


def _add_overwrite(p, what: str) -> None:
    p.add_argument(
        "--overwrite", action="store_true", help=f"{what}; an output that contains the source or a run is refused"
    )


def build_parser() -> argparse.ArgumentParser:
    debug = argparse.ArgumentParser(add_help=False)
    debug.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser = argparse.ArgumentParser(
        prog="minicpm-jax",
        description=__doc__.splitlines()[0],
        epilog="exit codes: " + "; ".join(f"{k} {v}" for k, v in EXIT_CODES.items()),
    )
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser = functools.partial(sub.add_parser, parents=[debug])

    p = sub.add_parser("demo", help="tiny MiniCPM4: build, run, export to Hugging Face, reload in PyTorch")
    p.add_argument("--output", help="where the outputs go (default outputs/demo, with --full outputs/demo-full)")
    p.add_argument("--full", action="store_true", help="the three papers at toy scale -> OUTPUT/report.md")
    p.add_argument("--smoke", action="store_true", help="with --full: every step with tiny budgets")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="pretrain from a recipe (configs/recipes/*.yaml), resuming if possible")
    p.add_argument("--config", required=True, help="recipe YAML")
    distributed.add_arguments(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("convert", help="convert a dense checkpoint into a hybrid (configs/recipes/convert-*.yaml)")
    p.add_argument("--config", required=True, help="conversion recipe YAML")
    _add_overwrite(p, "let output_dir hold other files (kept; never the teacher or another run)")
    p.add_argument(
        "--plan", action="store_true", help="compile every stage's train step from abstract shapes; print memory"
    )
    _add_plan_arguments(p)
    distributed.add_arguments(p)
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("distill", help="on-policy distillation from a recipe (configs/recipes/distill-*.yaml)")
    p.add_argument("words", nargs="*", help="'plot RUN_DIR' (draw a run's diagnostic panels), or key=value overrides")
    p.add_argument("--config", help="distillation recipe YAML")
    _add_overwrite(p, "let output_dir hold other files (kept; never the student, teacher or another run)")
    p.add_argument("--plan", action="store_true", help="compile the train step from abstract shapes; print memory")
    _add_plan_arguments(p)
    distributed.add_arguments(p)
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("generate", help="complete prompts with a checkpoint (its tokenizer and chat template)")
    p.add_argument("--checkpoint", required=True, help="minicpm_jax checkpoint or Hugging Face directory")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="prompt text (repeatable)")
    source.add_argument(
        "--input",
        help='JSONL: {"prompt": ...} or {"messages": [...]}, optional "id", "max_new_tokens" and sampling keys',
    )
    p.add_argument("--output", help="write JSONL results here (default: print; one --prompt is streamed)")
    _add_overwrite(p, "replace an existing --output file")
    p.add_argument("--tokenizer", help="directory of the tokenizer (default: the checkpoint directory)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, help="0 = greedy (defaults: generation_config.json, else greedy)")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--min-p", type=float)
    p.add_argument("--repetition-penalty", type=float)
    p.add_argument("--seed", type=int, default=0, help="sampling seed (prompt i draws from fold_in(key(seed), i))")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="format prompts with the chat template (default: when the tokenizer has one)",
    )
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="compute dtype (default: the config's dtype)")
    distributed.add_arguments(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="evaluate a checkpoint on tasks (recipe YAML or --tasks); writes report.json/md")
    p.add_argument("--checkpoint", required=True, help="minicpm_jax checkpoint, Hugging Face directory or preset")
    p.add_argument("--config", help="eval recipe YAML (configs/recipes/eval-*.yaml): tasks: {name: options}")
    p.add_argument("--tasks", help="comma-separated tasks to run (from the recipe, else with default options)")
    p.add_argument("--output", help="report directory (default: the recipe's output_dir, else outputs/eval)")
    _add_overwrite(p, "write into a non-empty report directory (an earlier report's files are replaced)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's; byte-level for a preset)")
    p.add_argument("--batch-size", type=int, help="requests per batch (default: the recipe's, else 8)")
    p.add_argument("--lm-eval", metavar="TASKS", help="comma-separated lm-evaluation-harness tasks (needs [eval])")
    p.add_argument("--lm-eval-include-path", metavar="DIR", help="folder of extra harness task YAML files")
    p.add_argument("--limit", type=int, help="--lm-eval: at most N documents per task")
    distributed.add_arguments(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("info", help="parameter count and per-device memory of a model preset")
    p.add_argument("model", help="preset name (see configs/models) or a YAML file")
    p.add_argument("--devices", type=int, default=None, help="device count for the mesh (default: this host's)")
    p.add_argument(
        "--train-plan",
        action="store_true",
        help="compile the train step from abstract shapes and print per-device memory (needs the "
        "devices: on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=8)",
    )
    _add_plan_arguments(p)
    p.add_argument("--plan-seq-len", type=int, default=4096)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("import-hf", help="Hugging Face checkpoint directory -> minicpm_jax checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("output")
    _add_overwrite(p, "replace an earlier native checkpoint at OUTPUT")
    distributed.add_arguments(p)
    p.set_defaults(func=cmd_import_hf)

    p = sub.add_parser("export-hf", help="checkpoint, HF directory or preset -> Hugging Face directory")
    p.add_argument("source", help="minicpm_jax checkpoint, Hugging Face directory, or preset (fresh init)")
    p.add_argument("output")
    _add_overwrite(p, "replace an earlier Hugging Face export at OUTPUT")
    p.add_argument("--format", choices=("minicpm", "llama"), default="minicpm")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer directory to copy along (default: SOURCE's own, if any)"
    )
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="split safetensors above this size")
    distributed.add_arguments(p)
    p.set_defaults(func=cmd_export_hf)

    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; expected failures print one ``error:`` line on stderr (see ``EXIT_CODES``)."""
    from minicpm_jax.train.loop import TrainingDiverged, TrainingStopped

    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    bad = [a for a in extra if "=" not in a or a.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like mesh.fsdp=4)")
    args.overrides = extra
    try:
        if distributed.initialize_from_args(args) and not distributed.is_main():
            console.quiet = True
        args.func(args)
    except (ValueError, OSError, yaml.YAMLError, TrainingDiverged, TrainingStopped, KeyboardInterrupt) as e:
        if args.debug:
            if not distributed.multiprocess():
                raise
            traceback.print_exc()
        err_console.print(f"[red]error:[/] {escape(one_line(e))}", highlight=False)
        if isinstance(e, TrainingStopped):  # every host stops at the same step: a normal shutdown
            return 128 + e.signum
        code = 128 + signal.SIGINT if isinstance(e, KeyboardInterrupt) else 3 if isinstance(e, TrainingDiverged) else 2
    except Exception:
        if not distributed.multiprocess():
            raise
        traceback.print_exc()
        code = 1
    else:
        return 0
    if distributed.multiprocess():
        distributed.abandon(code)
    return code


def one_line(e: BaseException) -> str:
    """The message of ``e`` on one line (a multi-line ``ConfigError`` becomes ``head: a; b``)."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted (KeyboardInterrupt)"
    lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
    return lines[0] if len(lines) == 1 else f"{lines[0]} {'; '.join(lines[1:])}"


if __name__ == "__main__":
    sys.exit(main())
