"""Corpus loading, train/val split, tokenizer training and cache, token-stream batches."""

import json
import os
from pathlib import Path

import pytest
import torch

from dsmoe.train import tokenizer as tokmod
from dsmoe.train.data import (
    DataError,
    Document,
    TokenStream,
    encode_corpus,
    load_corpus,
    split_corpus,
    stdlib_files,
)
from dsmoe.train.tokenizer import EOT_TOKEN, eot_id, load_tokenizer, save_tokenizer, train_tokenizer

SOURCE = '''# -*- coding: utf-8 -*-
def greet(name: str) -> str:
    """Say hello — in several scripts: héllo, привет, 你好, こんにちは 🎉."""
\treturn f"Hello, {name}!  ✓"\r\n

class Point:
    x: float = 0.0  # µm
'''


def _folder(tmp_path: Path) -> Path:
    root = tmp_path / "corpus"
    (root / "sub" / "deep").mkdir(parents=True)
    (root / "b.txt").write_text("beta text\n")
    (root / "a.md").write_text("# alpha\n")
    (root / "sub" / "c.py").write_text(SOURCE)
    (root / "sub" / "deep" / "d.txt").write_text("delta δ\n")
    (root / "sub" / "empty.txt").write_text("  \n")  # whitespace only: dropped
    (root / "skip.bin").write_bytes(b"\x00\x01")  # other suffixes ignored
    (root / ".hidden").mkdir()
    (root / ".hidden" / "e.txt").write_text("hidden")  # hidden folders ignored
    (root / "folder.txt").mkdir()  # a folder with a text suffix is not a file
    return root


@pytest.fixture
def tiny_docs():
    return [Document(f"doc{i}.py", SOURCE.replace("greet", f"greet{i}") * 3) for i in range(6)]


@pytest.fixture
def tiny_tok(tiny_docs, tmp_path):
    return train_tokenizer(tiny_docs, 300, tmp_path / "cache")


# ---------------------------------------------------------------------------------------------- loading


def test_folder_corpus(tmp_path):
    docs = load_corpus(_folder(tmp_path))
    assert [d.name for d in docs] == ["a.md", "b.txt", "sub/c.py", "sub/deep/d.txt"]
    assert docs[2].text == SOURCE
    assert load_corpus(str(_folder(tmp_path / "again"))) == docs  # str path, deterministic


def test_single_text_file(tmp_path):
    f = tmp_path / "book.txt"
    f.write_text("just one file\n")
    assert load_corpus(f) == [Document("book.txt", "just one file\n")]


def test_jsonl_corpus(tmp_path):
    f = tmp_path / "data.jsonl"
    lines = [json.dumps({"text": "first", "id": 1}), "", json.dumps({"text": "second\u2028line"}),
             json.dumps({"text": "   "})]
    f.write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = load_corpus(f)
    assert docs == [Document("data.jsonl:1", "first"), Document("data.jsonl:3", "second\u2028line")]


@pytest.mark.parametrize("line", ['{"text": "ok"', '["text"]', '{"title": "no text"}', '{"text": 3}'])
def test_jsonl_bad_line(tmp_path, line):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps({"text": "fine"}) + "\n" + line + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:2: "):
        load_corpus(f)


def test_missing_path(tmp_path):
    with pytest.raises(DataError, match="nowhere: no such file or folder"):
        load_corpus(tmp_path / "nowhere")


def test_empty_folder(tmp_path):
    (tmp_path / "only.bin").write_bytes(b"x")
    with pytest.raises(DataError, match=r"no \.txt, \.py, \.md files"):
        load_corpus(tmp_path)


def test_no_text(tmp_path):
    (tmp_path / "a.txt").write_text("")
    (tmp_path / "b.md").write_text("\n\t \n")
    with pytest.raises(DataError, match="no text"):
        load_corpus(tmp_path)


def test_unsupported_file(tmp_path):
    f = tmp_path / "data.csv"
    f.write_text("a,b\n")
    with pytest.raises(DataError, match="unsupported corpus file"):
        load_corpus(f)


def test_unreadable_file_broken_link(tmp_path):
    root = _folder(tmp_path)
    (root / "sub" / "gone.txt").symlink_to(root / "does-not-exist.txt")
    with pytest.raises(DataError, match=r"cannot read .*gone\.txt"):
        load_corpus(root)


def test_unreadable_file_permission(tmp_path, monkeypatch):
    root = _folder(tmp_path)
    real = Path.read_bytes

    def read_bytes(self):
        if self.name == "b.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(DataError, match=r"cannot read .*b\.txt: Permission denied"):
        load_corpus(root)


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads chmod-000 files")
def test_unreadable_file_chmod(tmp_path):
    root = _folder(tmp_path)
    (root / "b.txt").chmod(0)
    try:
        with pytest.raises(DataError, match=r"b\.txt"):
            load_corpus(root)
    finally:
        (root / "b.txt").chmod(0o644)


def test_not_utf8(tmp_path):
    (tmp_path / "latin.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin\.txt: not valid UTF-8"):
        load_corpus(tmp_path)


def test_stdlib_files_listed():
    files = stdlib_files()
    assert len(files) >= 100
    names = [f.name for f in files]
    assert "os.py" in names and "functools.py" in names
    assert not any(part in {"test", "tests", "site-packages", "idlelib"} for f in files for part in f.parts[-3:-1])
    assert all(f.stat().st_size <= 200_000 for f in files[:50])


# ------------------------------------------------------------------------------------------------ split


def test_split_deterministic_and_nonempty():
    docs = [Document(f"file{i}.py", f"text {i}") for i in range(200)]
    train, val = split_corpus(docs, 0.1, seed=0)
    assert (train, val) == split_corpus(list(docs), 0.1, seed=0)
    assert set(d.name for d in train).isdisjoint(d.name for d in val)
    assert len(train) + len(val) == 200 and 5 <= len(val) <= 40
    # a document's side depends only on its name: dropping other documents does not move it
    train2, val2 = split_corpus(docs[:100], 0.1, seed=0)
    assert {d.name for d in val2} == {d.name for d in val if int(d.name[4:-3]) < 100}
    assert split_corpus(docs, 0.1, seed=1)[1] != val  # the seed changes the split
    # two documents: one each side, whatever the fraction
    for frac in (0.001, 0.5, 0.999):
        t, v = split_corpus(docs[:2], frac)
        assert len(t) == 1 and len(v) == 1
    assert split_corpus(docs, 0.0) == (docs, [])


def test_split_single_document():
    train, val = split_corpus([Document("book", "x" * 95 + "y" * 5)], 0.05)
    assert train[0].text == "x" * 95 and val[0].text == "y" * 5
    t, v = split_corpus([Document("ab", "ab")], 0.01)
    assert t[0].text == "a" and v[0].text == "b"
    with pytest.raises(ValueError):
        split_corpus([Document("a", "abc")], 1.0)


# -------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_specials(tiny_tok):
    assert eot_id(tiny_tok) == 0 and tiny_tok.token_to_id("<|pad|>") == 1
    assert tiny_tok.get_vocab_size() <= 300
    unseen = "λx: x ** 2  # ∑ ünïcödé 𝔘 \t\n\r\n  trailing  "
    for text in (SOURCE, unseen, " leading space", ""):
        ids = tiny_tok.encode(text).ids
        assert tiny_tok.decode(ids) == text
    assert len(tiny_tok.encode(SOURCE).ids) < len(SOURCE.encode())  # merges learned


def test_tokenizer_cache_hit(tiny_docs, tmp_path, monkeypatch):
    cache = tmp_path / "c"
    first = train_tokenizer(tiny_docs, 300, cache)
    files = list(cache.glob("tokenizer-*.json"))
    assert len(files) == 1 and len(files[0].stem) == len("tokenizer-") + 16
    assert not list(cache.glob("*.tmp"))

    class NoTraining:
        def __init__(self, *a, **k):
            raise AssertionError("retrained despite a cache hit")

    monkeypatch.setattr(tokmod.trainers, "BpeTrainer", NoTraining)
    second = train_tokenizer(tiny_docs, 300, cache)
    assert second.to_str() == first.to_str()
    with pytest.raises(AssertionError, match="retrained"):  # other inputs, other key
        train_tokenizer(tiny_docs, 301, cache)
    with pytest.raises(AssertionError, match="retrained"):
        train_tokenizer(tiny_docs[:-1], 300, cache)


def test_tokenizer_cache_env_and_damaged_file(tiny_docs, tmp_path, monkeypatch):
    monkeypatch.setenv("DSMOE_CACHE", str(tmp_path / "env"))
    tok = train_tokenizer(tiny_docs, 280)
    (f,) = (tmp_path / "env").glob("tokenizer-*.json")
    f.write_text("{ broken")
    assert train_tokenizer(tiny_docs, 280).to_str() == tok.to_str()  # retrained and replaced
    assert load_tokenizer(f).to_str() == tok.to_str()
    monkeypatch.delenv("DSMOE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tokmod.default_cache_dir() == tmp_path / "xdg" / "dsmoe"


def test_tokenizer_bad_vocab(tiny_docs, tmp_path):
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(tiny_docs, 100, tmp_path)


def test_load_tokenizer_errors(tiny_tok, tmp_path):
    save_tokenizer(tiny_tok, tmp_path / "model" / "tokenizer.json")
    assert load_tokenizer(tmp_path / "model").to_str() == tiny_tok.to_str()  # a folder works too
    with pytest.raises(DataError, match="tokenizer file not found"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(DataError, match="not a valid tokenizer.json"):
        load_tokenizer(bad)


# ----------------------------------------------------------------------------------------- token stream


def test_encode_corpus(tiny_docs, tiny_tok):
    stream = encode_corpus(tiny_docs, tiny_tok, chunk_docs=4)  # two chunks
    ids = stream.tokens.tolist()
    assert ids[-1] == 0 and ids.count(0) == len(tiny_docs)  # one EOT after each document
    first = ids[: ids.index(0)]
    assert tiny_tok.decode(first) == tiny_docs[0].text
    assert tiny_tok.decode(ids, skip_special_tokens=False).count(EOT_TOKEN) == len(tiny_docs)


def test_stream_windows_contiguous():
    stream = TokenStream(torch.arange(100, dtype=torch.int32))
    x, y, nxt = stream.batch(3, batch_size=2, seq_len=5)
    assert x.dtype == torch.long and x.shape == (2, 5) and y.shape == (2, 5)
    assert x.tolist() == [[3, 4, 5, 6, 7], [8, 9, 10, 11, 12]]
    assert y.tolist() == [[4, 5, 6, 7, 8], [9, 10, 11, 12, 13]]
    assert nxt == 13
    # MTP lookahead: targets extended by `extra`, depth-k labels are targets[:, k:k+T]
    x, y, nxt = stream.batch(3, 2, 5, extra=2)
    assert y.shape == (2, 7) and y[0].tolist() == [4, 5, 6, 7, 8, 9, 10] and nxt == 13
    assert torch.equal(y[:, 1:6], x + 2)
    win, _ = stream.windows(3, 2, 5, extra=2)
    assert win.shape == (2, 8)


def test_stream_resume_and_wrap():
    stream = TokenStream(torch.randint(0, 50, (1000,)))
    pos, run = 0, []
    for _ in range(30):  # 30 * 4 * 16 = 1920 > 1000 tokens: wraps around
        x, y, pos = stream.batch(pos, 4, 16, extra=1)
        run.append((x, y, pos))
    # resume from a saved position: identical batches
    pos = run[9][2]
    for x0, y0, p0 in run[10:]:
        x, y, pos = stream.batch(pos, 4, 16, extra=1)
        assert torch.equal(x, x0) and torch.equal(y, y0) and pos == p0
    assert all(0 <= p < 1000 for _, _, p in run)
    # near the end, a window continues from the start of the stream
    small = TokenStream(torch.arange(10))
    x, y, nxt = small.batch(7, 2, 3)
    assert x.tolist() == [[7, 8, 9], [0, 1, 2]] and y.tolist() == [[8, 9, 0], [1, 2, 3]] and nxt == 3
    assert small.batch(17, 2, 3)[0].tolist() == x.tolist()  # positions are taken modulo the length
    assert stream.batches_per_epoch(4, 16) == 15


def test_stream_errors():
    with pytest.raises(DataError, match="fewer than one window"):
        TokenStream(torch.arange(8)).batch(0, 1, 8)
    with pytest.raises(ValueError, match="1-D integer"):
        TokenStream(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="position"):
        TokenStream(torch.arange(20)).batch(-1, 1, 4)


def test_tokenizer_trains_on_deterministic_prefix(tiny_docs):
    texts = tokmod._training_texts(tiny_docs, max_chars=len(tiny_docs[0].text) + 10)
    assert [n for n, _ in texts] == ["doc0.py", "doc1.py"] and len(texts[1][1]) == 10
    assert tokmod.tokenizer_cache_key(tiny_docs, 300, 50) != tokmod.tokenizer_cache_key(tiny_docs, 300, 60)


def test_shuffled_windows_cover_an_epoch_and_resume_exactly():
    stream = TokenStream(torch.arange(1000))
    seen, pos = [], 0
    for _ in range(13):  # 52 windows: one epoch of 49 and a bit
        win, pos = stream.shuffled_windows(pos, 4, 20, extra=1, seed=3)
        assert win.shape == (4, 22)
        assert torch.equal(win[:, 1:] - win[:, :-1], torch.ones(4, 21, dtype=torch.long))  # contiguous rows
        seen += (win[:, 0] // 20).tolist()
    count = (1000 - 22) // 20 + 1
    assert sorted(seen[:count]) == list(range(count))  # one epoch visits every window once
    assert seen[:count] != sorted(seen[:count])  # in a shuffled order
    # Resuming from a saved position on a fresh stream reads the same batches.
    again = TokenStream(torch.arange(1000)).shuffled_windows(8, 4, 20, extra=1, seed=3)[0]
    assert torch.equal(again, stream.shuffled_windows(8, 4, 20, extra=1, seed=3)[0])
    assert not torch.equal(again, stream.shuffled_windows(8, 4, 20, extra=1, seed=4)[0])
