"""``minicpm-jax generate``: native and Hugging Face checkpoints, JSONL in/out, streaming, errors."""

import json
from pathlib import Path

import jax.numpy as jnp
import pytest

from minicpm_jax import cli
from minicpm_jax.ckpt import load_any, save_model
from minicpm_jax.config import load_config
from minicpm_jax.generate import SamplingParams, generate
from minicpm_jax.generate.text import encode_prompt, load_tokenizer
from minicpm_jax.interop import save_hf_checkpoint
from minicpm_jax.model import create_model

MINICPM4_TOKENIZER = Path(__file__).resolve().parents[2] / "data" / "minicpm4-tokenizer"
# untied head and larger init, so that a random model does not just repeat one token
VARIED = ["model.initializer_range=0.3", "model.tie_word_embeddings=false"]
GREEDY = ("--temperature", "0", "--dtype", "float32")
FIELDS = {"id", "prompt", "completion", "token_ids", "logprobs", "model_logprobs", "finish_reason", "prompt_tokens"}


def run(capsys, *argv):
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def read_jsonl(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def native(tmp_path_factory):
    """tiny-minicpm4 (vocab 512) saved with the byte-level tokenizer marker."""
    cfg = load_config("tiny-minicpm4", VARIED).model
    path = tmp_path_factory.mktemp("native") / "ckpt"
    save_model(create_model(cfg, seed=1), cfg, path, tokenizer_source="byte")
    return path


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """tiny-minicpm4 with MiniCPM4's vocabulary, exported to HF layout with the real tokenizer files."""
    cfg = load_config("tiny-minicpm4", VARIED + ["model.vocab_size=73448"]).model
    path = tmp_path_factory.mktemp("hf") / "hf"
    save_hf_checkpoint(create_model(cfg, seed=2), cfg, path, dtype="float32", tokenizer_dir=MINICPM4_TOKENIZER)
    return path


def test_save_model_writes_tokenizer_files(native, tmp_path):
    assert json.loads((native / "byte_tokenizer.json").read_text())["type"] == "byte"
    assert json.loads((native / "generation_config.json").read_text())["eos_token_id"] == 2
    assert load_tokenizer(native).stop_ids == [2]


def test_save_model_copies_a_tokenizer_json_file(tmp_path):
    """data.tokenizer may name a tokenizer.json file under any name: it is saved as tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "[UNK]": 5}
    hf = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    hf.add_special_tokens(["<pad>", "<s>", "</s>"])
    hf.save(str(tmp_path / "my_tok.json"))
    cfg = load_config("tiny-minicpm4").model
    out = save_model(create_model(cfg, seed=0), cfg, tmp_path / "ckpt", tokenizer_source=tmp_path / "my_tok.json")
    tok = load_tokenizer(out)
    assert (out / "tokenizer.json").is_file() and tok.stop_ids == [2]
    assert tok.encode("hello world") == [3, 4] and tok.decode([1, 3, 4, 2]) == "hello world"
    with pytest.raises(FileNotFoundError, match="tokenizer: no such file or directory .*nope"):
        save_model(create_model(cfg, seed=0), cfg, tmp_path / "bad", tokenizer_source=tmp_path / "nope")


def test_native_jsonl_greedy_equals_generate(capsys, native, tmp_path):
    lines = [
        {"id": "a", "prompt": "Hello"},
        {"prompt": "The quick brown fox", "max_new_tokens": 3},
        {"id": 7, "prompt": "héllo wörld", "repetition_penalty": 1.3},
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    out = tmp_path / "out.jsonl"
    code, text = run(capsys, "generate", "--checkpoint", native, "--input", tmp_path / "in.jsonl", "--output", out,
                     "--max-new-tokens", 12, *GREEDY)  # fmt: skip
    assert code == 0, text
    records = read_jsonl(out)
    assert [r["id"] for r in records] == ["a", 1, 7] and all(set(r) == FIELDS for r in records)
    assert [len(r["token_ids"]) for r in records] == [12, 3, 12]
    assert records[1]["finish_reason"] == "length" and records[2]["prompt"] == "héllo wörld"

    _, model = load_any(native, dtype=jnp.float32)
    tok = load_tokenizer(native)
    prompts = [tok.encode(x["prompt"]) for x in lines]
    sampling = [SamplingParams(temperature=0.0, repetition_penalty=x.get("repetition_penalty", 1.0)) for x in lines]
    ref = generate(model, prompts, max_new_tokens=12, sampling=sampling, stop_token_ids=[2])
    for i, r in enumerate(records):
        n = len(r["token_ids"])
        assert r["token_ids"] == ref.row_tokens(i)[:n]
        assert r["completion"] == tok.decode(r["token_ids"])
        assert r["model_logprobs"] == pytest.approx(ref.model_logprobs[i, :n].tolist(), abs=1e-5)


def test_sampled_results_do_not_depend_on_batch_size(capsys, native, tmp_path):
    outs = []
    for batch_size in (1, 3):
        out = tmp_path / f"b{batch_size}.jsonl"
        code, text = run(capsys, "generate", "--checkpoint", native, "--prompt", "ab", "--prompt", "cd", "--prompt",
                         "ef", "--output", out, "--max-new-tokens", 6, "--temperature", 1.0, "--top-k", 20,
                         "--seed", 3, "--batch-size", batch_size, "--dtype", "float32")  # fmt: skip
        assert code == 0, text
        outs.append([r["token_ids"] for r in read_jsonl(out)])
    assert outs[0] == outs[1] and len({tuple(t) for t in outs[0]}) == 3


def test_single_prompt_streams_to_terminal(capsys, native):
    code, text = run(capsys, "generate", "--checkpoint", native, "--prompt", "Hi", "--max-new-tokens", 10, *GREEDY)
    assert code == 0, text
    _, model = load_any(native, dtype=jnp.float32)
    tok = load_tokenizer(native)
    ref = generate(model, [tok.encode("Hi")], max_new_tokens=10, stop_token_ids=[2])
    assert text.startswith(tok.decode(ref.row_tokens(0)))
    assert f"finish_reason={ref.finish_reasons[0]}, {ref.lengths[0]} tokens" in text


def test_hf_dir_with_minicpm4_tokenizer_chat(capsys, hf_dir, tmp_path):
    transformers = pytest.importorskip("transformers")
    messages = [{"role": "user", "content": "你好, who are you?"}]
    lines = [{"id": "chat", "messages": messages}, {"id": "plain", "prompt": "Say hi"}]
    (tmp_path / "in.jsonl").write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines))
    out = tmp_path / "out.jsonl"
    code, text = run(capsys, "generate", "--checkpoint", hf_dir, "--input", tmp_path / "in.jsonl", "--output", out,
                     "--max-new-tokens", 5, *GREEDY)  # fmt: skip
    assert code == 0, text
    records = read_jsonl(out)
    assert all(set(r) == FIELDS for r in records) and records[0]["prompt"] == messages

    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    prompts = [
        hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True),
        hf_tok.apply_chat_template([{"role": "user", "content": "Say hi"}], add_generation_prompt=True, tokenize=True),
    ]
    tok = load_tokenizer(hf_dir)
    assert [encode_prompt(tok, x.get("messages", x.get("prompt")), chat=True) for x in lines] == prompts
    assert [r["prompt_tokens"] for r in records] == [len(p) for p in prompts]
    _, model = load_any(hf_dir, dtype=jnp.float32)
    ref = generate(model, prompts, max_new_tokens=5, stop_token_ids=[2, 73440])
    assert [r["token_ids"] for r in records] == [ref.row_tokens(0), ref.row_tokens(1)]
    assert records[1]["completion"] == hf_tok.decode(ref.row_tokens(1), skip_special_tokens=True)


def test_hf_dir_defaults_come_from_generation_config(hf_dir):
    from minicpm_jax.generate.requests import generation_defaults

    assert generation_defaults(hf_dir) == {"temperature": 0.8, "top_p": 0.8}


@pytest.fixture(scope="module")
def no_tokenizer(tmp_path_factory):
    cfg = load_config("tiny-minicpm4").model
    path = tmp_path_factory.mktemp("bare") / "ckpt"
    save_model(create_model(cfg, seed=0), cfg, path)
    return path


JSONL_ERRORS = {
    "bad_json": ('{"prompt": "a"}\n{"prompt": \n', "line 2: not valid JSON"),
    "no_prompt": ('{"id": 1}\n', "line 1: give exactly one of 'prompt'"),
    "unknown_key": ('{"prompt": "a", "temprature": 0.5}\n', "unknown keys ['temprature']"),
    "bad_override": ('{"prompt": "a"}\n{"prompt": "b", "temperature": -1}\n', "line 2: invalid SamplingParams"),
    "empty_line_prompt": ('{"prompt": ""}\n', "line 1: empty prompt"),
}


@pytest.mark.parametrize("case", list(JSONL_ERRORS))
def test_jsonl_errors(capsys, native, tmp_path, case):
    content, expected = JSONL_ERRORS[case]
    (tmp_path / "in.jsonl").write_text(content)
    code, text = run(capsys, "generate", "--checkpoint", native, "--input", tmp_path / "in.jsonl", *GREEDY)
    assert code == 2 and expected in text, text
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize(
    "argv,expected",
    [
        (["--prompt", ""], "empty prompt"),
        (["--prompt", "x" * 1100], "1100 tokens; the model's context (max_position_embeddings) is 1024"),
        (["--prompt", "a", "--top-p", "1.5"], "top_p=1.5 (accepted: 0 < top_p <= 1)"),
        (["--prompt", "a", "--max-new-tokens", "0"], "max_new_tokens=0"),
        (["--input", "missing.jsonl"], "cannot read"),
        (["--prompt", "a", "--chat"], "has no chat template"),
        (["--prompt", "a", "--tokenizer", str(MINICPM4_TOKENIZER)], "vocabulary of 73448 tokens"),
    ],
)
def test_generate_errors(capsys, native, argv, expected):
    code, text = run(capsys, "generate", "--checkpoint", native, *argv, *GREEDY)
    assert code == 2 and expected in text, text


def test_missing_tokenizer_error(capsys, no_tokenizer):
    code, text = run(capsys, "generate", "--checkpoint", no_tokenizer, "--prompt", "a")
    assert code == 2 and "looked for tokenizer.json, tokenizer.model, byte_tokenizer.json" in text, text
    code, text = run(capsys, "generate", "--checkpoint", "tiny-minicpm4", "--prompt", "a")  # a preset: no directory
    assert code == 2 and "no such file or directory tiny-minicpm4" in text, text
