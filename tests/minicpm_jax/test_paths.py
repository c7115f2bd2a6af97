"""The path layer (minicpm_jax.paths): the same data pipeline, metrics, reports and safetensors round trips
through a local directory and through fsspec's in-memory filesystem, globs with ``**``, and remote URLs
that keep their scheme through config loading (no network: gs:// paths are only built, never opened)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from upath import UPath

from minicpm_jax.config import load_config
from minicpm_jax.config.loading import load_recipe
from minicpm_jax.config.schema import DataConfig
from minicpm_jax.data import load_tokenizer, train_dataset
from minicpm_jax.eval.report import atomic_write_text, write_report
from minicpm_jax.interop import load_hf_checkpoint, save_hf_checkpoint
from minicpm_jax.interop.files import atomic_directory, is_hf_checkpoint
from minicpm_jax.interop.layout import param_variables
from minicpm_jax.model import create_model
from minicpm_jax.paths import as_path, files_under, glob_files, is_remote, orbax_path, replace, rmtree
from minicpm_jax.safety import check_output, jsonl_output
from minicpm_jax.train.checkpoint import TrainCheckpointer, verify_manifest, write_manifest
from minicpm_jax.train.metrics import MetricsLogger, read_metrics

TOK = load_tokenizer(None)


@pytest.fixture
def memory_root():
    root = as_path(f"memory://paths-test-{uuid.uuid4().hex[:8]}/root")
    root.mkdir(parents=True)
    yield root
    rmtree(root)
    assert not root.exists()


@pytest.fixture
def roots(tmp_path, memory_root):
    """A local and an in-memory directory, both empty."""
    local = tmp_path / "root"
    local.mkdir()
    return local, memory_root


def _tree(root) -> dict[str, bytes]:
    return {name: path.read_bytes() for name, path in files_under(root).items()}


def test_schemes_are_kept_and_local_paths_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for url in ("gs://bucket/run/checkpoints", "s3://bucket/a/b.jsonl", "memory://x/y"):
        path = as_path(url)
        assert isinstance(path, UPath) and is_remote(path) and str(path) == url
        assert str(path / "c") == url + "/c" and str(path.parent) == url.rsplit("/", 1)[0]
        assert as_path(path) is path
    local = as_path("data/x.jsonl")
    assert type(local) is type(Path()) and not is_remote(local) and local == tmp_path / "data" / "x.jsonl"
    assert as_path(f"file://{tmp_path}/a") == tmp_path / "a" and not is_remote(f"file://{tmp_path}")
    epath = orbax_path(as_path("gs://bucket/run/checkpoints"))
    assert type(epath).__module__.startswith("etils.epath") and str(epath) == "gs://bucket/run/checkpoints"
    assert orbax_path(local) is local
    with pytest.raises(ValueError, match="orbax checkpoints support local paths, gs:// and s3:// only"):
        orbax_path(as_path("memory://x/ckpt"))


def test_gs_paths_survive_config_loading():
    overrides = ["data.paths=[gs://bucket/corpus/**/*.jsonl, s3://bucket/more.parquet]", "train.output_dir=gs://b/run"]
    cfg = load_config("tiny-minicpm4", overrides)
    assert cfg.data.paths == ("gs://bucket/corpus/**/*.jsonl", "s3://bucket/more.parquet")
    assert [str(as_path(p)) for p in cfg.data.paths] == list(cfg.data.paths)
    out = as_path(cfg.train.output_dir)
    assert isinstance(out, UPath) and out.protocol == "gs" and str(out / "checkpoints") == "gs://b/run/checkpoints"
    recipe = load_recipe("pretrain-minicpm4-0.5b", ["data.paths=[gs://bucket/shards-*.arrayrecord]"])
    assert [str(as_path(p)) for p in recipe.data.paths] == ["gs://bucket/shards-*.arrayrecord"]


def test_recursive_globs_match_the_same_files(roots):
    names = ["top.jsonl", "a/x.jsonl", "a/b/y.jsonl", "a/b/c/z.jsonl", "a/.hidden.jsonl", "a/b/notes.txt"]
    found = []
    for root in roots:
        for name in names:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(name)
        (root / "d.jsonl").mkdir()  # a directory matching the pattern is not a file
        found.append(
            {
                pattern: [p.relative_to(root).as_posix() for p in glob_files(f"{root}/{pattern}")]
                for pattern in ("**/*.jsonl", "a/**/*.jsonl", "*/*.jsonl", "a/.*", "a/b/*", "nothing/**/*.x")
            }
        )
    local, memory = found
    assert local == memory
    assert local["**/*.jsonl"] == ["a/b/c/z.jsonl", "a/b/y.jsonl", "a/x.jsonl", "top.jsonl"]
    assert local["a/**/*.jsonl"] == ["a/b/c/z.jsonl", "a/b/y.jsonl", "a/x.jsonl"]
    assert local["a/.*"] == ["a/.hidden.jsonl"] and local["nothing/**/*.x"] == []


def _write_corpus(root, docs: list[str]) -> None:
    (root / "jsonl" / "part").mkdir(parents=True, exist_ok=True)
    half = len(docs) // 2
    for name, chunk in (("a.jsonl", docs[:half]), ("part/b.jsonl", docs[half:])):
        (root / "jsonl" / name).write_text("".join(json.dumps({"text": d}) + "\n\n" for d in chunk))
    (root / "parquet").mkdir(exist_ok=True)
    with (root / "parquet" / "c.parquet").open("wb") as f:
        pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), f)
    ids = np.concatenate([np.asarray(TOK.encode(d, add_bos=True, add_eos=True), np.int32) for d in docs])
    (root / "array").mkdir(exist_ok=True)
    with (root / "array" / "d.npy").open("wb") as f:
        np.save(f, ids)


@pytest.mark.parametrize(
    "source,pattern", [("jsonl", "jsonl/**/*.jsonl"), ("parquet", "parquet/*"), ("array", "array/d.npy")]
)
def test_data_pipeline_reads_the_same_batches(roots, source, pattern):
    docs = [f"document {i}: " + "lorem ipsum " * (i % 7 + 1) for i in range(40)]
    batches = []
    for root in roots:
        _write_corpus(root, docs)
        cfg = DataConfig(source=source, paths=(f"{root}/{pattern}",), seq_len=48, eval_documents=4)
        ds = train_dataset(
            cfg, tokenizer=TOK, global_batch_size=4, vocab_size=512, max_position_embeddings=1024, num_epochs=1
        )
        batches.append(list(ds))
    local, memory = batches
    assert len(local) == len(memory) > 3
    for a, b in zip(local, memory, strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    tokens = sorted(int(t) for b in local for t in b["input_ids"][b["segment_ids"] > 0])
    assert len(tokens) > 40 * 10


def test_data_errors_name_the_remote_path(memory_root):
    with pytest.raises(FileNotFoundError, match=f"glob '{memory_root}/\\*\\*/\\*.jsonl' matches no file"):
        train_dataset(
            DataConfig(source="jsonl", paths=(f"{memory_root}/**/*.jsonl",)),
            tokenizer=TOK,
            global_batch_size=4,
            vocab_size=512,
            max_position_embeddings=1024,
        )
    (memory_root / "dir").mkdir()
    with pytest.raises(ValueError, match="is a directory"):
        train_dataset(
            DataConfig(source="jsonl", paths=(str(memory_root / "dir"),)),
            tokenizer=TOK,
            global_batch_size=4,
            vocab_size=512,
            max_position_embeddings=1024,
        )


def test_metrics_and_reports_round_trip(roots):
    results = {"arith": {"task": "arith", "options": {"n": 3}, "metrics": {"acc": 0.5}, "rows": [{"q": "1+1"}]}}
    seen = []
    for root in roots:
        run = root / "run"
        logger = MetricsLogger(run)
        for step in (1, 2, 3):
            logger.log(step, {"loss": 1.0 / step, "lr": None})
        logger.close()
        resumed = MetricsLogger(run)  # a resume at step 2 drops step 3, then logs again
        resumed.rewind(2)
        resumed.log(3, {"loss": 0.25})
        resumed.close()
        report = write_report(root / "eval", results, source="ckpt", config={"seed": 1})
        atomic_write_text(root / "eval" / "extra.txt", "x\n")
        with jsonl_output(root / "out.jsonl") as f:
            f.write('{"a": 1}\n')
        tree = _tree(root)
        assert any(name.startswith("run/tensorboard/events.out.tfevents.") and data for name, data in tree.items())
        seen.append(
            (read_metrics(run), report, {k: v for k, v in tree.items() if not k.startswith("run/tensorboard/")})
        )
    local, memory = seen
    assert local == memory
    assert local[0] == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": 0.25}]
    assert sorted(local[2]) == [
        "eval/extra.txt",
        "eval/report.json",
        "eval/report.md",
        "out.jsonl",
        "run/metrics.jsonl",
    ]
    assert json.loads(local[2]["eval/report.json"])["results"]["arith"]["metrics"] == {"acc": 0.5}


def test_safetensors_export_import_round_trip(roots, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in a local folder named after the URL
    cfg = load_config("tiny-minicpm4").model
    model = create_model(cfg, seed=3, dtype=jnp.float32)
    trees = []
    for root in roots:
        save_hf_checkpoint(model, cfg, root / "hf", dtype="float32", max_shard_bytes=200_000, tokenizer_dir="byte")
        assert is_hf_checkpoint(root / "hf")
        cfg2, model2 = load_hf_checkpoint(root / "hf", dtype=jnp.float32)
        assert cfg2 == cfg
        for (p, a), (_, b) in zip(param_variables(model), param_variables(model2), strict=True):
            np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(p))
        save_hf_checkpoint(model2, cfg2, root / "hf", dtype="float32", max_shard_bytes=200_000, tokenizer_dir="byte")
        trees.append(_tree(root))  # the second export replaced the first (an earlier output of its kind)
    local, memory = trees
    assert local == memory
    assert "hf/model.safetensors.index.json" in local and sum(n.endswith(".safetensors") for n in local) > 1
    assert "hf/byte_tokenizer.json" in local and "hf/generation_config.json" in local
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root"]


def test_outputs_are_never_replaced_remotely(memory_root):
    (memory_root / "mine").mkdir()
    (memory_root / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not an earlier output"), atomic_directory(memory_root / "mine"):
        pass
    with pytest.raises(FileExistsError, match="give --overwrite"):
        check_output(memory_root / "mine", overwrite=False)
    (memory_root / "run" / "checkpoints").mkdir(parents=True)
    (memory_root / "run" / "checkpoints" / "x").write_text("")
    with pytest.raises(FileExistsError, match="contains a training run"):
        check_output(memory_root, overwrite=True)
    with pytest.raises(RuntimeError, match="boom"), atomic_directory(memory_root / "new") as tmp:
        (tmp / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")
    assert sorted(files_under(memory_root)) == ["mine/notes.txt", "run/checkpoints/x"]
    assert (memory_root / "mine" / "notes.txt").read_text() == "keep"


def test_replace_manifests_and_unsupported_checkpoint_dirs(roots):
    for root in roots:
        (root / "step" / "sub").mkdir(parents=True)
        (root / "step" / "sub" / "w.bin").write_bytes(b"\x00\x01")
        (root / "step" / "meta").write_text("m")
        write_manifest(root / "step")
        assert verify_manifest(root / "step") is None
        replace(root / "step", root / "moved")
        assert not (root / "step").exists() and sorted(files_under(root)) == [
            "moved/meta",
            "moved/sha256.json",
            "moved/sub/w.bin",
        ]
        (root / "moved" / "sub" / "w.bin").write_bytes(b"\x00\x02")
        assert "w.bin: checksum mismatch" in verify_manifest(root / "moved")
        rmtree(root / "moved")
        rmtree(root / "moved")  # a missing directory is fine
        assert files_under(root) == {}
    with pytest.raises(ValueError, match="not memory://"):
        TrainCheckpointer(roots[1] / "checkpoints", keep=1)


def test_tokenizers_and_recipes_load_from_urls(memory_root, tmp_path):
    """The official MiniCPM4 tokenizer directory (SentencePiece + added tokens), one tokenizer file and a
    recipe (with its model preset file) read from ``memory://`` equal their local originals; ``train``
    runs from that recipe and saves the URL's tokenizer into its checkpoint."""
    official = Path(__file__).resolve().parents[1] / "data" / "minicpm4-tokenizer"
    for f in official.iterdir():
        (memory_root / "tok" / f.name).parent.mkdir(parents=True, exist_ok=True)
        (memory_root / "tok" / f.name).write_bytes(f.read_bytes())
    text = "<|im_start|>user\nMiniCPM4 on gs:// 123<|im_end|>"
    local, remote = load_tokenizer(official), load_tokenizer(f"{memory_root}/tok")
    assert remote.encode(text, add_bos=True) == local.encode(text, add_bos=True) and len(local.encode(text)) > 5
    assert (remote.stop_ids, remote.chat_template, remote.bos_id) == (local.stop_ids, local.chat_template, local.bos_id)
    single = load_tokenizer(f"{memory_root}/tok/tokenizer.model")  # a file: its config files come along
    assert single.encode(text, add_bos=True) == local.encode(text, add_bos=True)
    with pytest.raises(FileNotFoundError, match="no such file or directory memory://"):
        load_tokenizer(f"{memory_root}/missing")

    (memory_root / "cfg").mkdir()
    preset = Path(__file__).resolve().parents[2] / "configs" / "models" / "tiny-minicpm4.yaml"
    (memory_root / "cfg" / "model.yaml").write_text(preset.read_text())
    recipe = {"model": f"{memory_root}/cfg/model.yaml", "data": {"tokenizer": f"{memory_root}/tok"}}
    (memory_root / "cfg" / "run.yaml").write_text(json.dumps(recipe))
    cfg = load_recipe(f"{memory_root}/cfg/run.yaml", ["train.steps=3"])
    assert cfg.model == load_config("tiny-minicpm4").model and cfg.train.steps == 3
    assert cfg.data.tokenizer == f"{memory_root}/tok"
    from minicpm_jax import cli

    train = ["train.steps=2", "train.global_batch_size=8", "data.seq_len=32", "data.synthetic_documents=40"]
    train += ["data.eval_documents=0", "model.vocab_size=73448", f"train.output_dir={tmp_path / 'run'}"]
    train += ["optimizer.warmup_steps=0", "optimizer.decay_steps=0"]
    assert cli.main(["train", "--config", f"{memory_root}/cfg/run.yaml", *train]) == 0
    assert load_tokenizer(tmp_path / "run" / "final").encode(text) == local.encode(text)  # the URL's files saved
