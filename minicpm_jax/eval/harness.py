"""lm-evaluation-harness backend: the model ``minicpm-jax`` of ``lm_eval`` (needs ``pip install
'minicpm-jax[eval]'``).

``lm_eval.simple_evaluate(model="minicpm-jax", model_args="checkpoint=DIR,batch_size=8")`` or
``MiniCPMLM(model=model, tokenizer=tok)`` on an in-memory model. Requests are tokenized as lm-eval's
``hf`` backend does (BOS per the tokenizer config unless the text starts with it; context/continuation
split on the whole encoding; rolling windows of ``lm_eval.utils``), scored by ``eval.scoring`` and
generated greedily by ``generate.engine``, so results equal ``hf`` on the exported checkpoint.
``run_harness`` runs harness tasks on a checkpoint and writes ``lm_eval.json`` / ``lm_eval.md``.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text

from minicpm_jax.eval import scoring
from minicpm_jax.eval.report import atomic_write_text, progress
from minicpm_jax.eval.tasks import greedy_completions

GREEDY_NOOPS = ("temperature", "top_p", "top_k")  # sampling knobs, without effect when do_sample=False


@register_model("minicpm-jax")
class MiniCPMLM(TemplateLM):
    """``checkpoint``: native checkpoint, Hugging Face directory or preset (or pass ``model`` and a loaded
    ``tokenizer``); ``tokenizer``: a directory; ``max_length``: tokens the model reads per request
    (default: ``max_position_embeddings``); ``dtype``: compute dtype of a loaded checkpoint.
    ``device``/``max_batch_size`` (passed by lm-eval) are ignored: JAX uses its default devices."""

    def __init__(
        self,
        checkpoint: str | None = None,
        *,
        model=None,
        tokenizer=None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        max_gen_toks: int = 256,
        dtype: str = "float32",
        device: str | None = None,
        max_batch_size: int | None = None,
        **unknown,
    ):
        super().__init__()
        if unknown:
            accepted = "checkpoint, tokenizer, batch_size, max_length, max_gen_toks, dtype"
            raise ValueError(f"minicpm-jax: unknown model_args {sorted(unknown)} (accepted: {accepted})")
        if (checkpoint is None) == (model is None):
            raise ValueError("minicpm-jax: give model_args checkpoint=DIR (or model= and tokenizer= in Python)")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise ValueError(f"minicpm-jax: batch_size={batch_size!r} (accepted: an integer >= 1; no 'auto')")
        if dtype not in ("float32", "bfloat16"):
            raise ValueError(f"minicpm-jax: dtype={dtype!r} (accepted: float32, bfloat16)")
        if model is None:
            from minicpm_jax.eval.loading import load_model_and_tokenizer

            _, model, tokenizer = load_model_and_tokenizer(checkpoint, tokenizer=tokenizer, dtype=jnp.dtype(dtype))
        elif tokenizer is None or isinstance(tokenizer, (str, Path)):
            raise ValueError("minicpm-jax: with model=, pass tokenizer= a loaded minicpm_jax Tokenizer")
        context = model.config.max_position_embeddings
        self.max_length = int(max_length or context)
        if not 2 <= self.max_length <= context:
            raise ValueError(f"minicpm-jax: max_length={max_length} (accepted: 2..{context}, the model's context)")
        self.model, self.tok, self.batch_size = model, tokenizer, int(batch_size)
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.eos_id if self.tok.bos_id is None else self.tok.bos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As ``hf``: special tokens per the tokenizer config, none when the text already starts with BOS."""
        bos = self.tok.special_tokens.get("bos_token")
        if add_special_tokens is None and bos and string.startswith(bos):
            add_special_tokens = False
        return self.tok.encode(string, add_bos=self.tok.add_bos and add_special_tokens is not False)

    def _score(self, pairs, what: str) -> list[tuple[float, bool]]:
        with progress(len(pairs), f"lm-eval {what}") as advance:
            return scoring.loglikelihood(self.model, pairs, self.batch_size, on_batch=advance)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """Scores ``(request, context ids, continuation ids)``, left-truncated to ``max_length`` inputs as ``hf``."""
        pairs = []
        for _, ctx, cont in requests:
            if len(cont) > self.max_length:
                raise ValueError(f"minicpm-jax: continuation of {len(cont)} tokens > max_length={self.max_length}")
            seq = (list(ctx) + list(cont))[-(self.max_length + 1) :]
            pairs.append((seq[: len(seq) - len(cont)], list(cont)))
        out = self._score(pairs, "loglikelihood")
        for (request, _, _), answer in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", request, answer)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Sum of log p over each whole text, in the disjoint ``max_length`` windows of ``lm_eval.utils``."""
        windows = [
            [
                lm_utils.make_disjoint_window(w)
                for w in lm_utils.get_rolling_token_windows(
                    self.tok_encode(text), self.prefix_token_id, self.max_length, context_len=1
                )
            ]
            for (text,) in (r.args for r in requests)
        ]
        scores = self._score([w for ws in windows for w in ws], "loglikelihood_rolling")
        out, k = [], 0
        for request, ws in zip(requests, windows):
            out.append(sum(s for s, _ in scores[k : k + len(ws)]))
            k += len(ws)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, out[-1])
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy completions of at most ``max_gen_toks`` tokens, cut before the first ``until`` string."""
        prompts, budgets, stops = [], [], []
        eos = self.tok.special_tokens.get("eos_token")
        for context, gen_kwargs in (r.args for r in requests):
            kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
            stops.append(handle_stop_sequences(kwargs.pop("until", None), eos=eos))
            budget = kwargs.pop("max_gen_toks")
            if kwargs.pop("do_sample", False):
                raise ValueError("minicpm-jax: generate_until is greedy only (do_sample=True is not supported)")
            unsupported = sorted(set(kwargs) - set(GREEDY_NOOPS))
            if unsupported:
                raise ValueError(
                    f"minicpm-jax: unsupported generation kwargs {unsupported} "
                    "(accepted: until, max_gen_toks, do_sample=False)"
                )
            if not 1 <= budget < self.max_length:
                raise ValueError(f"minicpm-jax: max_gen_toks={budget} (accepted: 1..{self.max_length - 1})")
            prompts.append(self.tok_encode(context)[-(self.max_length - budget) :])
            budgets.append(budget)
        texts = greedy_completions(
            self.model, self.tok, prompts, budgets, batch_size=self.batch_size, what="lm-eval generate_until"
        )
        out = [postprocess_generated_text(text, stop, None) for text, stop in zip(texts, stops)]
        for request, text in zip(requests, out):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return out


def run_harness(
    checkpoint: str,
    tasks: list[str],
    output_dir: str | Path,
    *,
    include_path: str | None = None,
    tokenizer: str | None = None,
    batch_size: int = 8,
    limit: float | None = None,
    dtype: str = "float32",
) -> dict:
    """Run harness ``tasks`` on ``checkpoint`` through ``minicpm-jax`` (offline when the task data is
    local) and write ``lm_eval.json`` (all results, atomically) and ``lm_eval.md`` (the harness table)."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--lm-eval-include-path: no such directory {include_path!r}")
    manager = TaskManager(include_path=include_path)
    missing = [t for t in tasks if not manager.match_tasks([t])]
    if missing:
        raise ValueError(f"--lm-eval: unknown harness tasks {missing} (add their YAML with --lm-eval-include-path)")
    args = {"checkpoint": str(checkpoint), "batch_size": batch_size, "dtype": dtype}
    model = MiniCPMLM(**args, tokenizer=tokenizer)
    results = lm_eval.simple_evaluate(model=model, tasks=tasks, limit=limit, task_manager=manager, log_samples=False)
    results["config"]["model_args"] = args | {"tokenizer": tokenizer}
    if jax.process_index() == 0:
        out = Path(output_dir)
        atomic_write_text(out / "lm_eval.json", json.dumps(results, indent=2, default=str, ensure_ascii=False) + "\n")
        atomic_write_text(
            out / "lm_eval.md", f"# lm-evaluation-harness on `{checkpoint}`\n\n{lm_utils.make_table(results)}"
        )
    return results
