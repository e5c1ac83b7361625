"""Token shards (`dsmoe tokenize`): the same stream as the corpus in memory, training loss for loss, exact
resume, sources (.jsonl field, .parquet), non-UTF-8 files skipped or refused."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

from dsmoe.train import data, tokenizer
from dsmoe.train.data import DataError
from dsmoe.train.loop import TrainConfig, train
from dsmoe.train.metrics import read_metrics
from dsmoe.train.shards import open_shards, write_shards

SMALL = dict(preset="tiny-v1", batch_size=4, seq_len=32, eval_every=3, eval_batches=1, vocab_size=300)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for module in (json, os, subprocess, inspect):
        (folder / f"{module.__name__}.py").write_text(inspect.getsource(module))
    return folder


@pytest.fixture(scope="module")
def tok_dir(corpus, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tok")
    train_docs, _ = data.split_corpus(data.load_corpus(corpus))
    tokenizer.save_tokenizer(tokenizer.train_tokenizer(train_docs, 300, use_cache=False), directory / "tokenizer.json")
    return directory


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _in_memory(source: Path, tok_dir: Path, field: str = "text"):
    tok = tokenizer.load_tokenizer(tok_dir)
    train_docs, val_docs = data.split_corpus(data.load_corpus(source, field))
    return data.encode_corpus(train_docs, tok), data.encode_corpus(val_docs, tok)


def test_shards_hold_the_in_memory_stream_and_read_the_same_windows(corpus, tok_dir, tmp_path):
    index = write_shards(corpus, tok_dir, tmp_path / "shards", shard_tokens=997)  # documents straddle shards
    assert index["dtype"] == "uint16" and len(index["splits"]["train"]["shards"]) > 10
    _, train_s, val_s = open_shards(tmp_path / "shards")
    train_m, val_m = _in_memory(corpus, tok_dir)
    assert torch.equal(train_s._slice(0, len(train_s)), train_m.tokens.long())
    assert torch.equal(val_s._slice(0, len(val_s)), val_m.tokens.long())
    for position in (0, 5, 2 * len(train_m) // 32 - 3, 10_000):  # ... across an epoch boundary
        a, next_a = train_s.shuffled_windows(position, 4, 32, 1, seed=3)
        b, next_b = train_m.shuffled_windows(position, 4, 32, 1, seed=3)
        assert torch.equal(a, b) and next_a == next_b
    for position in (0, len(val_m) - 10):  # wraps around the end
        assert torch.equal(val_s.windows(position, 2, 16)[0], val_m.windows(position, 2, 16)[0])


def test_training_from_shards_matches_memory_loss_for_loss_and_resumes_exactly(corpus, tmp_path):
    memory = tmp_path / "memory"
    train(TrainConfig(out=memory, data=corpus, steps=6, save_every=3, **SMALL))
    write_shards(corpus, memory, tmp_path / "shards", shard_tokens=4096)  # the run's own tokenizer
    streamed = tmp_path / "streamed"
    train(TrainConfig(out=streamed, data=tmp_path / "shards", steps=6, save_every=3, **SMALL))
    expected = [(r["lm_loss"], r.get("val_loss")) for r in read_metrics(memory / "metrics.jsonl")]
    assert [(r["lm_loss"], r.get("val_loss")) for r in read_metrics(streamed / "metrics.jsonl")] == expected
    assert (streamed / "tokenizer.json").read_bytes() == (memory / "tokenizer.json").read_bytes()

    (streamed / "current").unlink()  # back to step 3, then resume: steps 4-6 again, the same
    (streamed / "current").symlink_to("step-000003")
    train(TrainConfig(out=streamed, data=tmp_path / "shards", steps=6, save_every=3, resume=True, **SMALL))
    assert [(r["lm_loss"], r.get("val_loss")) for r in read_metrics(streamed / "metrics.jsonl")] == expected


def test_jsonl_field_and_parquet_sources(tok_dir, tmp_path):
    pa, pq = pytest.importorskip("pyarrow"), pytest.importorskip("pyarrow.parquet")
    source = inspect.getsource(os)
    texts = [source[i:i + 1500] for i in range(0, 30_000, 1500)]
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"body": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    pq.write_table(pa.table({"content": texts, "n": list(range(len(texts)))}), tmp_path / "docs.parquet",
                   row_group_size=7)
    for source, field in (("docs.jsonl", "body"), ("docs.parquet", "content")):
        write_shards(tmp_path / source, tok_dir, tmp_path / f"{source}.shards", field=field)
        _, train_s, val_s = open_shards(tmp_path / f"{source}.shards")
        train_m, val_m = _in_memory(tmp_path / source, tok_dir, field)
        assert torch.equal(train_s._slice(0, len(train_s)), train_m.tokens.long()), source
        assert torch.equal(val_s._slice(0, len(val_s)), val_m.tokens.long()), source
    with pytest.raises(DataError, match=r"docs\.parquet: no column 'text' \(columns: content, n\)"):
        write_shards(tmp_path / "docs.parquet", tok_dir, tmp_path / "other")


def test_a_file_that_is_not_utf8_is_skipped_with_a_warning_or_refused(corpus, tok_dir, tmp_path, capsys):
    import shutil

    folder = tmp_path / "corpus"
    shutil.copytree(corpus, folder)
    (folder / "latin.txt").write_bytes("café au lait\n".encode("latin-1") * 50)
    warnings: list[str] = []
    index = write_shards(folder, tok_dir, tmp_path / "shards", warn=warnings.append)
    assert len(warnings) == 1 and "latin.txt: not valid UTF-8 (byte 3): skipped" in warnings[0]
    assert index["skipped"] == warnings
    _, train_s, _ = open_shards(tmp_path / "shards")
    train_m, _ = _in_memory(corpus, tok_dir)  # the corpus without the skipped file
    assert torch.equal(train_s._slice(0, len(train_s)), train_m.tokens.long())
    with pytest.raises(DataError, match=r"latin\.txt: not valid UTF-8 .*--strict-data refuses it"):
        write_shards(folder, tok_dir, tmp_path / "strict", strict=True)
    from dsmoe.cli import main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(["tokenize", "--data", str(folder), "--tokenizer", str(tok_dir), "--out", str(tmp_path / "cli"),
              "--strict-data"])
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2 and stderr.startswith("dsmoe: error:") and "latin.txt" in stderr
    # training from the folder itself skips it too, with the warning as an event
    events: list[dict] = []
    with pytest.raises(Exception):  # stop right after the corpus is read: a window longer than the corpus
        train(TrainConfig(out=tmp_path / "run", data=folder, steps=1, **{**SMALL, "seq_len": 10**6}), events.append)
    assert [e["message"] for e in events if e["event"] == "warning"] == warnings


def test_vocabularies_over_65536_ids_use_uint32(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, 70_000)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    (tmp_path / "tok").mkdir()
    tok.save(str(tmp_path / "tok" / "tokenizer.json"))
    (tmp_path / "a.txt").write_text("w69999 w65536 w1 " * 40)
    index = write_shards(tmp_path / "a.txt", tmp_path / "tok", tmp_path / "shards", shard_tokens=7)
    assert index["dtype"] == "uint32" and index["eos_token_id"] == 0
    _, train_s, val_s = open_shards(tmp_path / "shards")
    stream = torch.cat((train_s._slice(0, len(train_s)), val_s._slice(0, len(val_s))))
    assert sorted(set(stream.tolist())) == [0, 1, 65536, 69999]  # ids past uint16, intact
