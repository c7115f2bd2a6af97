"""Each file source round-trips its documents through the pipeline; bad inputs raise clear errors."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from minicpm_jax.data import load_tokenizer, make_train_iterator

TOK = load_tokenizer(None)
DOCS = ["hello world", "the quick brown fox", "ünïcödé ✓ text", "a" * 150, "x", "last document"]


def _segments_and_expected(h, cfg) -> tuple[Counter, Counter]:
    """Packed segments of one pass, checked against the tokenized DOCS cut into seq_len chunks."""
    expected = []
    for doc in DOCS:
        ids = TOK.encode(doc, add_bos=True, add_eos=True)
        expected += [tuple(ids[i : i + cfg.seq_len]) for i in range(0, len(ids), cfg.seq_len)]
    return Counter(h.segments(h.one_pass(cfg))), Counter(expected)


def _cfg(h, source, paths, **kw):
    return h.data_cfg(source=source, paths=tuple(str(p) for p in paths), eval_documents=0, **kw)


def test_jsonl_round_trip_over_two_files_and_glob(h, tmp_path):
    for name, docs in (("a.jsonl", DOCS[:3]), ("b.jsonl", DOCS[3:])):
        lines = [json.dumps({"body": d, "id": i}) for i, d in enumerate(docs)]
        (tmp_path / name).write_text("\n".join(lines) + "\n\n")  # a blank line is skipped
    cfg = _cfg(h, "jsonl", [tmp_path / "*.jsonl"], text_field="body")
    got, expected = _segments_and_expected(h, cfg)
    assert got == expected


def test_parquet_round_trip(h, tmp_path):
    pq.write_table(pa.table({"text": DOCS, "n": list(range(len(DOCS)))}), tmp_path / "d.parquet", row_group_size=2)
    got, expected = _segments_and_expected(h, _cfg(h, "parquet", [tmp_path / "d.parquet"]))
    assert got == expected


def test_arrayrecord_round_trip_text_and_json_records(h, tmp_path):
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(tmp_path / "d.array_record"), "group_size:1")
    for i, doc in enumerate(DOCS):
        record = json.dumps({"text": doc}) if i % 2 else doc
        writer.write(record.encode("utf-8"))
    writer.close()
    got, expected = _segments_and_expected(h, _cfg(h, "arrayrecord", [tmp_path / "d.array_record"]))
    assert got == expected


def test_array_round_trip_documents_split_at_eos(h, tmp_path):
    eos = TOK.eos_id
    np.save(tmp_path / "a.npy", np.array([5, 6, eos, 7, 8, 9, eos], dtype=np.uint16))
    np.save(tmp_path / "b.npy", np.array([10, 11, eos, 12], dtype=np.int32))  # no final eos
    cfg = _cfg(h, "array", [tmp_path / "a.npy", tmp_path / "b.npy"])
    got = Counter(h.segments(h.one_pass(cfg)))
    assert got == Counter([(5, 6, eos), (7, 8, 9, eos), (10, 11, eos), (12,)])


def _make(h, cfg, tok=TOK, batch=4, **kw):
    args = dict(tokenizer=tok, global_batch_size=batch, vocab_size=h.VOCAB, max_position_embeddings=h.MAX_POS)
    return make_train_iterator(cfg, **{**args, **kw})


def test_missing_file_and_empty_glob(h, tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file.*missing.jsonl"):
        _make(h, _cfg(h, "jsonl", [tmp_path / "missing.jsonl"]))
    with pytest.raises(FileNotFoundError, match=r"glob .*\*.parquet.* matches no file"):
        _make(h, _cfg(h, "parquet", [tmp_path / "*.parquet"]))
    with pytest.raises(ValueError, match="data.paths: empty"):
        _make(h, _cfg(h, "jsonl", []))
    with pytest.raises(ValueError, match="is a directory"):
        _make(h, _cfg(h, "jsonl", [tmp_path]))


def test_empty_dataset(h, tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty dataset"):
        _make(h, _cfg(h, "jsonl", [tmp_path / "empty.jsonl"]))
    with pytest.raises(ValueError, match="empty training set.*eval_documents 10"):
        _make(h, h.data_cfg(synthetic_documents=10, eval_documents=10))


def test_wrong_text_field_and_bad_records(h, tmp_path):
    (tmp_path / "d.jsonl").write_text(json.dumps({"content": "hi"}) + "\n")
    with pytest.raises(ValueError, match="no string field 'text'.*keys: \\['content'\\]"):
        _make(h, _cfg(h, "jsonl", [tmp_path / "d.jsonl"]))
    (tmp_path / "bad.jsonl").write_text("not json\n")
    with pytest.raises(ValueError, match="bad.jsonl.*not a valid UTF-8 JSON record"):
        _make(h, _cfg(h, "jsonl", [tmp_path / "bad.jsonl"]))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match="column 'text' not in .*columns: \\['body'\\]"):
        _make(h, _cfg(h, "parquet", [tmp_path / "d.parquet"]))
    np.save(tmp_path / "big.npy", np.array([1, 600, 2]))
    with pytest.raises(ValueError, match="token ids in \\[1, 600\\].*vocabulary \\[0, 512\\)"):
        _make(h, _cfg(h, "array", [tmp_path / "big.npy"]))


def test_model_and_batch_checks(h):
    with pytest.raises(ValueError, match="seq_len: 2048 is larger than model.max_position_embeddings 1024"):
        _make(h, h.data_cfg(seq_len=2048))
    with pytest.raises(
        ValueError, match="global_batch_size: 6 must be a positive multiple of the number of processes \\(4\\)"
    ):
        _make(h, h.data_cfg(), batch=6, process_count=4)
    with pytest.raises(ValueError, match="vocabulary of 259 tokens.*larger than model.vocab_size 200"):
        _make(h, h.data_cfg(), vocab_size=200)
