"""The lm-evaluation-harness backend ``minicpm-jax`` equals lm-eval's ``hf`` backend on the Llama export."""

import json
from pathlib import Path

import jax.numpy as jnp
import pytest

from minicpm_jax import cli
from minicpm_jax.config import load_config
from minicpm_jax.generate.engine import generate
from minicpm_jax.generate.text import load_tokenizer
from minicpm_jax.interop import save_hf_checkpoint
from minicpm_jax.model import create_model

lm_eval = pytest.importorskip("lm_eval", reason="install the test extra: pip install -e '.[test]'")
harness = pytest.importorskip("minicpm_jax.eval.harness")
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

TOKENIZER = Path(__file__).resolve().parents[2] / "data" / "minicpm4-tokenizer"
MAX_LENGTH = 48  # small, so that the long question is left-truncated and the rolling text has windows
LONG = " ".join(f"word{i}" for i in range(40))
DOCS = [
    {"question": "The sun is", "choices": ["warm", "cold and dark", "a passkey"], "label": 0},
    {"question": "2 + 3 =", "choices": ["5", "23", "six"], "label": 0},
    {"question": "copy: abc ->", "choices": ["abc", "cba", "a b c"], "label": 1},
    {"question": "Question: which is red?\nAnswer:", "choices": ["apple", "sky", "grass"], "label": 0},
    {"question": f"{LONG} then", "choices": ["stop", "go on and on"], "label": 1},
    {"question": "passkey 25954. passkey?", "choices": ["25954", "12345", "none"], "label": 2},
]
TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {cache}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
  - metric: acc_norm
"""


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model with MiniCPM4's vocabulary, its Llama export with the real tokenizer, a local task."""
    root = tmp_path_factory.mktemp("harness")
    cfg = load_config(
        "tiny-minicpm4", ["model.vocab_size=73448", "model.initializer_range=0.3", "model.tie_word_embeddings=false"]
    ).model
    model = create_model(cfg, seed=3, dtype=jnp.float32)
    save_hf_checkpoint(model, cfg, root / "llama", format="llama", dtype="float32", tokenizer_dir=TOKENIZER)
    (root / "mc.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (root / "tasks").mkdir()
    (root / "tasks" / "tiny_mc.yaml").write_text(TASK.format(data=root / "mc.jsonl", cache=root / "cache"))
    return model, load_tokenizer(TOKENIZER), root


@pytest.fixture(scope="module")
def hf(setup):
    torch = pytest.importorskip("torch")
    from lm_eval.models.huggingface import HFLM

    torch.manual_seed(0)
    return HFLM(pretrained=str(setup[2] / "llama"), dtype="float32", device="cpu", batch_size=4, max_length=MAX_LENGTH)


def ours(setup, **kwargs):
    model, tok, _ = setup
    return harness.MiniCPMLM(model=model, tokenizer=tok, **({"batch_size": 4, "max_length": MAX_LENGTH} | kwargs))


def run_task(lm, root):
    manager = TaskManager(include_path=str(root / "tasks"))
    out = lm_eval.simple_evaluate(model=lm, tasks=["tiny_mc"], task_manager=manager, log_samples=True)
    scores = [resp[0][0] for s in out["samples"]["tiny_mc"] for resp in s["resps"]]
    return out["results"]["tiny_mc"], scores


@pytest.mark.torch
def test_multiple_choice_matches_hf(setup, hf):
    ref, ref_scores = run_task(hf, setup[2])
    got, got_scores = run_task(ours(setup), setup[2])
    assert len(got_scores) == sum(len(d["choices"]) for d in DOCS)
    assert max(abs(a - b) for a, b in zip(got_scores, ref_scores)) < 1e-4
    assert got["acc,none"] == ref["acc,none"] and got["acc_norm,none"] == ref["acc_norm,none"]


@pytest.mark.torch
def test_loglikelihood_and_rolling_match_hf(setup, hf):
    pairs = [("", "hello world"), ("The sun is ", "warm"), (f"<s>{LONG}", " end"), ("2 + 3 =", " 5")]
    texts = ["short text.", f"{LONG} and more: {LONG}", "<s>starts with the BOS token"]
    lm = ours(setup)
    assert len(lm.tok_encode(texts[1])) > 2 * MAX_LENGTH  # several windows
    for kind, args in (("loglikelihood", pairs), ("loglikelihood_rolling", [(t,) for t in texts])):
        requests = [Instance(kind, {}, a, i) for i, a in enumerate(args)]
        got, ref = getattr(lm, kind)(requests), getattr(hf, kind)(requests)
        got, ref = ([x[0] for x in v] if kind == "loglikelihood" else v for v in (got, ref))
        assert max(abs(a - b) for a, b in zip(got, ref)) < 1e-4, (kind, got, ref)


@pytest.mark.torch
def test_generate_until_honours_until_and_budget(setup, hf):
    model, tok, _ = setup
    lm = ours(setup)
    prompts = ["The sun is", "copy: abc ->"]
    uncut = generate(model, [lm.tok_encode(p) for p in prompts], max_new_tokens=12, stop_token_ids=tok.stop_ids)
    full = [tok.decode(uncut.row_tokens(i)) for i in range(len(prompts))]
    assert all(len(uncut.row_tokens(i)) == 12 for i in range(len(prompts)))  # no stop token: the cut is ours
    stop = full[0][len(full[0]) // 2 :][:2]
    requests = [
        Instance("generate_until", {}, (prompts[0], {"until": [stop], "max_gen_toks": 12, "do_sample": False}), 0),
        Instance("generate_until", {}, (prompts[1], {"until": ["\u2603"], "max_gen_toks": 3}), 1),
        Instance("generate_until", {}, (prompts[1], {"until": "\u2603", "max_gen_toks": 12}), 2),
    ]
    got = lm.generate_until(requests)
    assert got == [full[0][: full[0].index(stop)], tok.decode(uncut.row_tokens(1)[:3]), full[1]]
    assert got == hf.generate_until(requests)
    with pytest.raises(ValueError, match="greedy only"):
        lm.generate_until([Instance("generate_until", {}, ("a", {"until": [], "do_sample": True}), 0)])
    with pytest.raises(ValueError, match="unsupported generation kwargs"):
        lm.generate_until([Instance("generate_until", {}, ("a", {"until": [], "num_beams": 2}), 0)])


def test_cli_runs_local_task_and_writes_report(setup, tmp_path, capsys):
    root = setup[2]
    argv = ["eval", "--checkpoint", str(root / "llama"), "--lm-eval", "tiny_mc", "--output", str(tmp_path / "out")]
    argv += ["--lm-eval-include-path", str(root / "tasks"), "--limit", "4", "--batch-size", "2"]
    assert cli.main(argv) == 0, capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "lm_eval.json").read_text())
    assert report["config"]["model_args"]["checkpoint"] == str(root / "llama")
    assert report["n-samples"]["tiny_mc"]["effective"] == 4
    assert 0.0 <= report["results"]["tiny_mc"]["acc,none"] <= 1.0
    assert "acc_norm" in (tmp_path / "out" / "lm_eval.md").read_text()


def test_bad_input(setup, tmp_path, capsys, monkeypatch):
    factory = get_model("minicpm-jax")
    with pytest.raises(ValueError, match=r"unknown model_args \['bogus'\]"):
        factory.create_from_arg_string(f"checkpoint={setup[2] / 'llama'},bogus=1")
    with pytest.raises(ValueError, match="no preset or file"):
        factory.create_from_arg_string(f"checkpoint={tmp_path / 'missing'}")
    with pytest.raises(ValueError, match="no 'auto'"):
        ours(setup, batch_size="auto")
    with pytest.raises(ValueError, match="dtype='fp8'"):
        factory.create_from_arg_string("checkpoint=tiny-minicpm4,dtype=fp8")
    assert cli.main(["eval", "--checkpoint", "x", "--lm-eval", "nope", "--tasks", "perplexity"]) == 2
    assert "harness tasks alone" in capsys.readouterr().err
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)
    assert cli.main(["eval", "--checkpoint", "x", "--lm-eval", "tiny_mc"]) == 2
    assert "pip install 'minicpm-jax[eval]'" in capsys.readouterr().err
