"""train/data.py: corpora, splits and batchers, checked against naive references.

Synthetic documents hold globally unique, consecutive token values, so a window's values
say exactly which document and position it came from, and a (input, target) pair names a
target uniquely. No JAX is needed.
"""

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from train import data
from train.data import (
    DataConfig,
    StreamBatcher,
    WindowBatcher,
    enwik8_split,
    eval_batches,
    hash_split,
    load_corpus,
    stdlib_files,
)


def unique_docs(lengths):
    """Documents of consecutive ids, disjoint ranges with a gap between them."""
    docs, start = [], 1
    for n in lengths:
        docs.append(np.arange(start, start + n, dtype=np.int64))
        start += n + 1000
    return docs


def all_targets(docs):
    return sorted((int(d[i]), int(d[i + 1])) for d in docs for i in range(len(d) - 1))


def read_targets(batches):
    pairs = []
    for b in batches:
        rows, cols = np.nonzero(b["loss_mask"])
        pairs += zip(
            b["tokens"][rows, cols].tolist(), b["tokens"][rows, cols + 1].tolist(), strict=True
        )
    return sorted(pairs)


def concat_processes(make, count):
    parts = [make(p) for p in range(count)]
    return {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}


def assert_batches_equal(a, b):
    assert a.keys() == b.keys() == {"tokens", "loss_mask", "reset"}
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# --- corpora ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stdlib_corpus():
    return load_corpus(DataConfig())


def test_stdlib_split_is_the_hashed_files_read_independently(stdlib_corpus):
    root, names = stdlib_files()
    walked = sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*.py")
        if "site-packages" not in p.relative_to(root).parts
    )
    assert names == walked and len(names) > 100
    train_names, val_names = hash_split(names, 0.05)
    assert set(train_names).isdisjoint(val_names) and set(train_names) | set(val_names) == set(
        names
    )
    assert 0.02 < len(val_names) / len(names) < 0.08
    val_bytes = [(root / n).read_bytes() for n in val_names]
    expected = [np.frombuffer(b, np.uint8) for b in val_bytes if len(b) >= 2]
    assert len(stdlib_corpus.val) == len(expected)
    for doc, ref in zip(stdlib_corpus.val, expected, strict=True):
        np.testing.assert_array_equal(doc, ref)
    n_train = sum(1 for n in train_names if (root / n).stat().st_size >= 2)
    assert len(stdlib_corpus.train) == n_train and stdlib_corpus.test == []
    assert stdlib_corpus.vocab_size == 256
    line = stdlib_corpus.describe()
    assert "\n" not in line and f"train {n_train:,} docs" in line


def test_stdlib_load_is_deterministic(stdlib_corpus):
    again = load_corpus(DataConfig())
    for split in ("train", "val"):
        a, b = getattr(stdlib_corpus, split), getattr(again, split)
        assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_hash_split_depends_only_on_each_name():
    names = [f"pkg/mod_{i}.py" for i in range(200)]
    _, val = hash_split(names, 0.1)
    _, val_subset = hash_split(names[::-1][:150], 0.1)
    assert set(val_subset) == set(val) & set(names[::-1][:150])
    assert len(hash_split(names[:1] + names[1:2], 1e-9)[1]) == 1  # at least one val file


def test_single_text_file_tail_split_and_bytes_tokenizer(tmp_path):
    raw = "héllo wörld, ".encode() * 20 + b"\xff"
    (tmp_path / "t.txt").write_bytes(raw)
    corpus = load_corpus(DataConfig(source=str(tmp_path / "t.txt"), val_fraction=0.1))
    n_val = round(len(raw) * 0.1)
    assert bytes(corpus.train[0]) == raw[:-n_val] and bytes(corpus.val[0]) == raw[-n_val:]
    assert isinstance(corpus.train[0], np.memmap)
    assert corpus.decode(corpus.encode("héllo")) == "héllo"
    assert corpus.decode([104, 105, 0xFF, 300]) == "hi\ufffd\ufffd"


def test_directory_hash_split_and_chars_tokenizer(tmp_path):
    texts = {f"d{i}/f{i}.txt": f"doc {i} ab" * 3 for i in range(30)}
    texts["z.txt"] = "zzz"
    for name, text in texts.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    (tmp_path / ".hidden").write_text("QQQQ")
    corpus = load_corpus(DataConfig(source=str(tmp_path), tokenizer="chars", val_fraction=0.2))
    train_names, val_names = hash_split(sorted(texts), 0.2)
    train_text = "".join(texts[n] for n in train_names)
    assert corpus.chars == "".join(sorted(set(train_text) | {"\ufffd"}))
    assert corpus.vocab_size == len(corpus.chars)
    decoded = [corpus.decode(d) for d in corpus.val]
    unknown = set("".join(texts[n] for n in val_names)) - set(train_text)
    assert decoded == [
        "".join("\ufffd" if c in unknown else c for c in texts[n]) for n in val_names
    ]
    assert [corpus.decode(d) for d in corpus.train] == [texts[n] for n in train_names]
    assert "Q" not in corpus.chars  # hidden files skipped


def test_enwik8_split_boundaries(tmp_path):
    tokens = np.arange(40)
    train, val, test = enwik8_split(tokens, sizes=(30, 4, 5))
    np.testing.assert_array_equal(np.concatenate([train, val, test]), tokens[:39])
    assert (len(train), len(val), len(test)) == (30, 4, 5) and val[0] == 30 and test[0] == 34
    big = tmp_path / "enwik8"
    with open(big, "wb") as f:
        f.truncate(100_000_123)  # sparse: no disk space, read lazily
    corpus = load_corpus(DataConfig(source=str(big), split="enwik8"))
    assert [len(s[0]) for s in (corpus.train, corpus.val, corpus.test)] == [90e6, 5e6, 5e6]
    assert all(isinstance(s[0], np.memmap) for s in (corpus.train, corpus.val, corpus.test))


@pytest.mark.parametrize("kind", ["npy", "uint16", "uint32"])
def test_token_arrays_round_trip(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(data, "_SCAN_CHUNK", 7)  # separators and extremes across chunks
    rng = np.random.default_rng(0)
    tokens = rng.integers(1, 900, size=203)
    tokens[[4, 5, 50, 51, 52, 120, 190, 200, 201]] = 0  # separators
    if kind == "npy":
        path = tmp_path / "t.npy"
        np.save(path, tokens.astype(np.int32))
        cfg = DataConfig(source=str(path), doc_separator=0, val_fraction=0.1)
    else:
        path = tmp_path / "t.bin"
        tokens.astype(kind).tofile(path)
        cfg = DataConfig(source=str(path), bin_dtype=kind, doc_separator=0, val_fraction=0.1)
    corpus = load_corpus(cfg)
    assert corpus.vocab_size == tokens.max() + 1 and corpus.tokenizer == "ids"
    assert all(isinstance(d, np.memmap) for d in corpus.train + corpus.val)
    cut = 203 - round(20.3)
    cuts = [
        0,
        5,
        6,
        51,
        52,
        53,
        121,
        cut,
        191,
        201,
        202,
        203,
    ]  # after each separator, and at the split
    naive = [tokens[a:b] for a, b in itertools.pairwise(cuts) if b - a >= 2]
    got = corpus.train + corpus.val
    assert len(got) == len(naive) and all(
        np.array_equal(g, n) for g, n in zip(got, naive, strict=True)
    )
    assert sum(len(d) for d in corpus.val) == 203 - cut - 2  # 1-token docs [201], [202] dropped
    assert corpus.decode(corpus.encode("3 0 17")) == "3 0 17"
    bigger = load_corpus(
        DataConfig(source=str(path), format=cfg.format, bin_dtype=cfg.bin_dtype, vocab_size=1024)
    )
    assert bigger.vocab_size == 1024


# --- errors -----------------------------------------------------------------------------


def config_errors(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "short.txt").write_bytes(b"x" * 1000)
    (tmp_path / "two.txt").write_bytes(b"ab")
    (tmp_path / "odd.bin").write_bytes(b"abc")
    np.save(tmp_path / "m.npy", np.zeros((2, 3), np.int32))
    np.save(tmp_path / "neg.npy", np.array([3, -1, 2, 2]))
    np.save(tmp_path / "ok.npy", np.arange(10))
    t = str(tmp_path)
    return [
        (dict(source=f"{t}/nope.txt"), FileNotFoundError, "source: no such file"),
        (dict(source=f"{t}/empty.txt"), ValueError, "source: file .* is empty"),
        (dict(source=f"{t}/emptydir"), ValueError, "source: no files found"),
        (dict(source=f"{t}/short.txt", split="enwik8"), ValueError, "at least 100,000,000 bytes"),
        (dict(source="stdlib", split="enwik8"), ValueError, "split='enwik8' needs one bytes file"),
        (dict(source=f"{t}/two.txt"), ValueError, "the train split has no usable tokens"),
        (dict(source=f"{t}/odd.bin"), ValueError, "not a multiple of 2 .bin_dtype='uint16'"),
        (dict(source=f"{t}/m.npy"), ValueError, "1-D integer array, got int32 .2, 3."),
        (dict(source=f"{t}/neg.npy"), ValueError, "token ids must be >= 0"),
        (
            dict(source=f"{t}/ok.npy", tokenizer="chars"),
            ValueError,
            "tokenizer='chars' applies to text",
        ),
        (dict(source=f"{t}/short.txt", doc_separator=0), ValueError, "doc_separator applies to"),
        (
            dict(source=f"{t}/ok.npy", vocab_size=5),
            ValueError,
            "vocab_size=5 is smaller .* needs .10.",
        ),
        (
            dict(source=f"{t}/emptydir", format="npy"),
            ValueError,
            "format='npy' needs source to be a file",
        ),
        (dict(source="stdlib", format="bin"), ValueError, "format='bin' does not apply"),
    ]


def test_load_corpus_errors(tmp_path):
    for kwargs, error, message in config_errors(tmp_path):
        with pytest.raises(error, match=message):
            load_corpus(DataConfig(**kwargs))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(format="csv"), "format must be one of 'auto', 'bytes', 'npy', 'bin', got 'csv'"),
        (dict(bin_dtype="int8"), "bin_dtype must be one of 'uint16', 'uint32', got 'int8'"),
        (dict(split="random"), "split must be one of"),
        (dict(tokenizer="bpe"), "tokenizer must be one of"),
        (dict(val_fraction=0.0), r"val_fraction must be in \(0, 1\), got 0.0"),
        (dict(val_fraction=1), r"val_fraction must be in \(0, 1\), got 1"),
        (dict(vocab_size=0), "vocab_size must be an int >= 1, got 0"),
        (dict(doc_separator=-1), "doc_separator must be an int >= 0, got -1"),
        (dict(source=""), "source must be 'stdlib' or a path"),
    ],
)
def test_config_errors(kwargs, message):
    cfg = DataConfig(source="x.bin", bin_dtype="uint32", vocab_size=7, doc_separator=0)
    assert DataConfig.from_json(cfg.to_json()) == cfg
    with pytest.raises(ValueError, match=message):
        DataConfig(**kwargs)


def test_batcher_errors():
    docs = unique_docs([10])
    for make, message in [
        (
            lambda: WindowBatcher(docs, batch_size=0, seq_len=4, seed=0),
            "batch_size must be an int >= 1, got 0",
        ),
        (
            lambda: WindowBatcher(docs, batch_size=2, seq_len=0, seed=0),
            "seq_len must be an int >= 1, got 0",
        ),
        (
            lambda: StreamBatcher(docs, batch_size=3, seq_len=4, process_count=2),
            r"batch_size \(3\) must be divisible by process_count \(2\)",
        ),
        (
            lambda: StreamBatcher(docs, batch_size=2, seq_len=4, process_index=2, process_count=2),
            r"process_index must be in \[0, 2\), got 2",
        ),
        (
            lambda: StreamBatcher([np.arange(1)], batch_size=2, seq_len=4),
            "none of the 1 documents has the 2 tokens",
        ),
        (
            lambda: StreamBatcher([np.arange(3)], batch_size=4, seq_len=4),
            "too few to give each of batch_size=4 rows",
        ),
        (
            lambda: eval_batches([np.zeros((2, 2), int)], batch_size=1, seq_len=2),
            r"docs\[0\] must be a 1-D integer array",
        ),
        (
            lambda: eval_batches(docs, batch_size=1, seq_len=2, max_batches=0),
            "max_batches must be an int >= 1",
        ),
        (
            lambda: StreamBatcher(docs, batch_size=1, seq_len=4, loop=False).batch(3),
            "step 3 is past the end .* loop=False",
        ),
    ]:
        with pytest.raises(ValueError, match=message):
            make()


# --- batchers ---------------------------------------------------------------------------


def test_windows_are_pure_in_step_and_lie_inside_documents():
    docs = unique_docs([40, 7, 25, 1, 90])
    batcher = WindowBatcher(docs, batch_size=8, seq_len=8, seed=3)
    assert_batches_equal(
        batcher.batch(11), WindowBatcher(docs, batch_size=8, seq_len=8, seed=3).batch(11)
    )
    assert not np.array_equal(batcher.batch(11)["tokens"], batcher.batch(12)["tokens"])
    assert not np.array_equal(
        batcher.batch(11)["tokens"],
        WindowBatcher(docs, batch_size=8, seq_len=8, seed=4).batch(11)["tokens"],
    )
    seen_short = False
    for step in range(20):
        b = batcher.batch(step)
        assert b["tokens"].dtype == np.int32 and b["tokens"].shape == (8, 9) and b["reset"].all()
        for row, mask in zip(b["tokens"], b["loss_mask"], strict=True):
            n = int(mask.sum()) + 1
            window = row[:n]
            doc = next(d for d in docs if d[0] <= window[0] <= d[-1])
            assert np.array_equal(window, np.arange(window[0], window[0] + n))  # contiguous
            assert window[-1] <= doc[-1] and (row[n:] == 0).all()
            assert mask[: n - 1].all() and n == min(9, len(doc))  # padded only for short docs
            seen_short |= n == 7
    assert seen_short


def test_windows_reach_every_start_position():
    docs = unique_docs([12, 10, 3])
    batcher = WindowBatcher(docs, batch_size=8, seq_len=8, seed=0)
    firsts = {int(t) for step in range(30) for t in batcher.batch(step)["tokens"][:, 0]}
    assert firsts == {int(d[o]) for d in docs for o in range(max(len(d) - 8, 1))}


def test_window_rows_split_across_processes():
    docs = unique_docs([30, 50])
    whole = WindowBatcher(docs, batch_size=8, seq_len=5, seed=1).batch(7)
    split = concat_processes(
        lambda p: WindowBatcher(
            docs, batch_size=8, seq_len=5, seed=1, process_index=p, process_count=4
        ).batch(7),
        4,
    )
    assert_batches_equal(whole, split)


def naive_stream(row_docs, seq_len, steps):
    """Walks a row's documents in order, seq_len targets per step, looping."""
    segments = []
    while len(segments) < steps:
        for doc in row_docs:
            for pos in range(0, len(doc) - 1, seq_len):
                segments.append((doc[pos : pos + seq_len + 1], pos == 0))
    return segments[:steps]


def test_stream_matches_naive_walk_over_documents():
    batch_size, seq_len, steps = 4, 5, 30
    docs = unique_docs([13] * 10)  # equal lengths: dealt round-robin, doc i to row i % 4
    batcher = StreamBatcher(docs, batch_size=batch_size, seq_len=seq_len)
    assert batcher.steps_per_epoch == 3 * math.ceil(12 / seq_len)
    rows = [naive_stream(docs[r::batch_size], seq_len, steps) for r in range(batch_size)]
    for step in range(steps):
        b = batcher.batch(step)
        for r in range(batch_size):
            window, reset = rows[r][step]
            np.testing.assert_array_equal(b["tokens"][r, : len(window)], window)
            assert (b["tokens"][r, len(window) :] == 0).all()
            np.testing.assert_array_equal(b["loss_mask"][r], np.arange(seq_len) < len(window) - 1)
            assert b["reset"][r] == reset


def test_stream_continuity_resets_and_every_target_once():
    docs = unique_docs([23, 4, 60, 2, 9, 17, 31])
    seq_len = 6
    batcher = StreamBatcher(docs, batch_size=3, seq_len=seq_len, loop=False)
    batches = [batcher.batch(t) for t in range(batcher.steps_per_epoch)]
    assert read_targets(batches) == all_targets(docs)
    doc_firsts = {int(d[0]) for d in docs}
    assert batches[0]["reset"].all()
    for prev, cur in itertools.pairwise(batches):
        for r in range(3):
            if not cur["loss_mask"][r].any():
                continue  # this row has finished the epoch
            assert cur["reset"][r] == (cur["tokens"][r, 0] in doc_firsts)
            if not cur["reset"][r]:
                assert cur["tokens"][r, 0] == prev["tokens"][r, seq_len]
    looped = StreamBatcher(docs, batch_size=3, seq_len=seq_len)
    fresh = StreamBatcher(docs, batch_size=3, seq_len=seq_len)
    assert_batches_equal(looped.batch(10**9), fresh.batch(10**9))  # no walk over earlier steps


def test_stream_stripes_one_document_over_rows():
    doc = np.arange(1, 101)  # one enwik8-style document, 8 rows
    batcher = StreamBatcher([doc], batch_size=8, seq_len=4, loop=False)
    first = batcher.batch(0)
    np.testing.assert_array_equal(first["tokens"][:, 0], doc[[100 * r // 8 for r in range(8)]])
    batches = [batcher.batch(t) for t in range(batcher.steps_per_epoch)]
    assert read_targets(batches) == all_targets([doc])
    assert batcher.steps_per_epoch == math.ceil(13 / 4)  # the longest stripe has 13 targets
    two = unique_docs([30, 11])  # fewer documents than rows: stripes cross documents
    batcher = StreamBatcher(two, batch_size=5, seq_len=3, loop=False)
    assert batcher.steps_per_epoch == 3  # stripes of 41 / 5 tokens: at most 9 targets each
    batches = [batcher.batch(t) for t in range(3)]
    assert read_targets(batches) == all_targets(two)


def test_stream_rows_split_across_processes():
    docs = unique_docs([23, 4, 60, 2, 9, 17, 31, 5])
    whole = StreamBatcher(docs, batch_size=4, seq_len=3)
    parts = [
        StreamBatcher(docs, batch_size=4, seq_len=3, process_index=p, process_count=2)
        for p in range(2)
    ]
    assert {p.steps_per_epoch for p in parts} == {whole.steps_per_epoch}
    for step in (0, 5, 17):
        assert_batches_equal(
            whole.batch(step), concat_processes(lambda p, step=step: parts[p].batch(step), 2)
        )


def test_eval_batches_cover_the_split_once_in_order():
    docs = unique_docs([23, 4, 60, 2, 9])
    batches = list(eval_batches(docs, batch_size=4, seq_len=6))
    assert read_targets(batches) == all_targets(docs)
    n_windows = sum(math.ceil((len(d) - 1) / 6) for d in docs)
    assert len(batches) == math.ceil(n_windows / 4)
    assert not batches[-1]["loss_mask"][n_windows % 4 :].any()
    np.testing.assert_array_equal(batches[0]["tokens"][:, 0], docs[0][[0, 6, 12, 18]])
    assert all(b["reset"].all() for b in batches)
    assert len(list(eval_batches(docs, batch_size=4, seq_len=6, max_batches=2))) == 2
    halves = [
        list(eval_batches(docs, batch_size=4, seq_len=6, process_index=p, process_count=2))
        for p in range(2)
    ]
    for whole, a, b in zip(batches, *halves, strict=True):
        assert_batches_equal(whole, concat_processes(lambda p, a=a, b=b: (a, b)[p], 2))


def test_corpus_feeds_batchers(stdlib_corpus):
    b = WindowBatcher(stdlib_corpus.train, batch_size=2, seq_len=32, seed=0).batch(0)
    text = stdlib_corpus.decode(b["tokens"][0])
    assert len(text) > 0 and b["loss_mask"].dtype == bool
    assert Path(stdlib_files()[0]).is_dir()
