"""Tokenizer loading, parity with transformers.AutoTokenizer, chat templates and streaming detokenization."""

import json
import shutil
from pathlib import Path

import pytest

from minicpm_jax.data.tokenizer import load_tokenizer, write_byte_tokenizer_marker
from minicpm_jax.generate.text import StreamDecoder, encode_prompt, render_chat

MINICPM4_TOKENIZER = Path(__file__).resolve().parents[2] / "data" / "minicpm4-tokenizer"

TEXTS = [
    "Hello world",
    " leading space",
    "  two leading spaces",
    "a  b   c\tTab",
    "\n\nnewlines\n",
    "\r\nwindows line",
    "你好，世界！",
    "emoji 🤖🎉 mixed",
    "naïve café Ωmega ﬁ ｆｕｌｌ",
    "def f(x):\n    return x**2\n",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|> user",
    "x<s>y</s>z<unk>",
    "text <|im_end|> after<|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>",
    "<|im_end|><|im_start|>",
    "",
    " ",
]
MESSAGES = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "Name 3 colours, 中文也行 🎨"},
    {"role": "assistant", "content": " red, green\nblue"},
    {"role": "user", "content": "<|im_end|> more?"},
]


@pytest.fixture(scope="module")
def hf():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(MINICPM4_TOKENIZER)


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(MINICPM4_TOKENIZER)


def test_minicpm4_special_ids(tok):
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (73448, 1, 73440)
    assert tok.stop_ids == [2, 73440]
    assert tok.add_bos and tok.chat_template is not None


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok, hf, text):
    ids = tok.encode(text)
    assert ids == hf.encode(text)
    assert tok.encode(text, add_bos=False) == hf.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)


def test_chat_template_matches_transformers(tok, hf):
    for messages in (MESSAGES[:2], MESSAGES):
        assert render_chat(tok, messages) == hf.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        assert render_chat(tok, messages, add_generation_prompt=False) == hf.apply_chat_template(
            messages, add_generation_prompt=False, tokenize=False
        )
        expected = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        assert encode_prompt(tok, messages, chat=True) == expected
    assert encode_prompt(tok, "hi", chat=True) == hf.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True
    )
    assert encode_prompt(tok, "hi", chat=False) == hf.encode("hi")


def test_tokenizer_json_directory_matches_transformers(tmp_path, hf):
    hf.save_pretrained(tmp_path)  # writes tokenizer.json (+ tokenizer.model): tokenizer.json is picked
    tok = load_tokenizer(tmp_path)
    assert type(tok.base).__name__ == "HFTokenizer"
    for text in TEXTS:
        assert tok.encode(text) == hf.encode(text)
        assert tok.decode(tok.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True)
    assert encode_prompt(tok, MESSAGES, chat=True) == hf.apply_chat_template(MESSAGES, add_generation_prompt=True)


def test_dummy_prefix_model_matches_llama_tokenizer(tmp_path):
    """A Llama-2-style model (add_dummy_prefix) in legacy mode: every chunk between added tokens gets '▁'."""
    transformers = pytest.importorskip("transformers")
    from sentencepiece import sentencepiece_model_pb2

    shutil.copytree(MINICPM4_TOKENIZER, tmp_path, dirs_exist_ok=True)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((tmp_path / "tokenizer.model").read_bytes())
    proto.normalizer_spec.add_dummy_prefix = True
    (tmp_path / "tokenizer.model").write_bytes(proto.SerializeToString())
    slow = transformers.AutoTokenizer.from_pretrained(tmp_path, use_fast=False)
    tok = load_tokenizer(tmp_path)
    for text in TEXTS:
        assert tok.encode(text) == slow.encode(text), text


@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_stream_decoder_pieces_add_up(tok, chunk):
    text = "emoji 🤖🎉 mixed 你好 naïve\n  end ✓"
    ids = tok.encode(text, add_bos=False) + [73440]
    stream = StreamDecoder(tok)
    pieces = [stream.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_holds_incomplete_bytes(tmp_path):
    write_byte_tokenizer_marker(tmp_path)
    tok = load_tokenizer(tmp_path)
    ids = tok.encode("a🤖b")
    stream = StreamDecoder(tok)
    assert stream.push(ids[:2]) == "a"  # 'a' + first byte of the emoji
    assert stream.push(ids[2:4]) == ""  # still incomplete: nothing, and no U+FFFD
    assert stream.push(ids[4:]) == "🤖b"
    assert stream.flush() == ""
    cut = StreamDecoder(tok)
    assert cut.push(ids[:3]) == "a"
    assert cut.flush() == "\ufffd"  # what is left at the end is emitted as is
    assert cut.text == tok.decode(ids[:3])


def test_byte_marker_directory(tmp_path):
    write_byte_tokenizer_marker(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id, tok.stop_ids) == (259, 1, 2, 0, [2])
    assert tok.chat_template is None
    assert tok.decode(tok.encode("héllo") + [2]) == "héllo"
    with pytest.raises(ValueError, match="no chat template"):
        render_chat(tok, [{"role": "user", "content": "x"}])
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    assert load_tokenizer(tmp_path).stop_ids == [7]


def test_missing_tokenizer_lists_what_was_looked_for(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json, tokenizer.model, byte_tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such file or directory"):
        load_tokenizer(tmp_path / "missing")


def test_bad_marker_and_messages(tmp_path):
    (tmp_path / "byte_tokenizer.json").write_text(json.dumps({"type": "byte", "offset": 4, "vocab_size": 259}))
    with pytest.raises(ValueError, match="offset"):
        load_tokenizer(tmp_path)
    (tmp_path / "byte_tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot parse"):
        load_tokenizer(tmp_path)


def test_bad_messages(tok):
    with pytest.raises(ValueError, match="non-empty list"):
        render_chat(tok, [])
    with pytest.raises(ValueError, match=r"entries \[1\]"):
        render_chat(tok, [{"role": "user", "content": "a"}, {"content": "b"}])
