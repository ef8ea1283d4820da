"""The training program's data: corpora on disk -> documents -> batches of token windows.

``load_corpus(DataConfig(...))`` turns a source into a ``Corpus``: train / val / test lists of
documents (1-D integer arrays) plus the tokenizer that maps them to and from text.

Sources:

* ``"stdlib"`` (the default; needs no download): every ``*.py`` file under the running
  Python's standard library (``sysconfig.get_paths()["stdlib"]``, ``site-packages``
  excluded), byte level (vocab 256). Files are sorted by relative path, so the corpus is the
  same on every machine with the same Python.
* raw bytes / text: one file, or a directory of files (every file below it, hidden names
  skipped). A directory is read into memory; a single file is memory-mapped, so enwik8-sized
  files cost no RAM with ``tokenizer="bytes"``.
* token arrays: ``.npy`` (1-D integer) or ``.bin`` (raw ``uint16`` / ``uint32``, nanoGPT
  style), memory-mapped and scanned in chunks, never loaded whole. ``doc_separator`` cuts them
  into documents; the separator ends each document (the model learns to predict it).

Documents are files (directory, stdlib) or contiguous stretches of a single file or array.
Splits are deterministic, never drawn from random state:

* ``split="fraction"`` with several files: a file goes to val when a hash of its relative path
  (sha256, read as a number in [0, 1)) is below ``val_fraction``; at least one file does.
  Whole files stay whole, and adding a file never moves another. With one file or a token
  array: the last ``val_fraction`` of it (at least 2 tokens) is val. No test split.
* ``split="enwik8"`` (one bytes file): the standard first 90e6 / next 5e6 / next 5e6 bytes.

Tokenizers for text: ``"bytes"`` (id = byte) or ``"chars"``: the sorted set of characters of
the training text (UTF-8, invalid bytes read as U+FFFD), plus U+FFFD, which every character
unseen in training maps to. Token arrays decode to space-separated ids.

Batchers produce numpy dicts, the rows of this process only (row ``r`` of the global batch
belongs to process ``r // (batch_size // process_count)``); each is a pure function of the
step, so a resumed run sees the same batches:

* ``tokens`` int32 ``[b, T + 1]`` (inputs ``[:, :-1]``, targets ``[:, 1:]``),
* ``loss_mask`` bool ``[b, T]``: False where the target is padding (pad id 0),
* ``reset`` bool ``[b]``: True where the row starts a new document, so recurrent state
  (XL memories) must be cleared before it.

``WindowBatcher`` draws random windows (plain LM training); ``StreamBatcher`` carries each row
from segment to segment (XL / recurrent models); ``eval_batches`` covers a split once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import itertools
import os
import sysconfig
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from xtx.config import Config

ENWIK8_SPLIT = (90_000_000, 5_000_000, 5_000_000)  # train, val, test bytes
_SCAN_CHUNK = 1 << 24  # tokens per read when scanning a memmap: bounded RAM
_UNKNOWN_CHAR = "\ufffd"


def _is_int(value) -> bool:
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def _check_int(name: str, value, low: int) -> None:
    if not _is_int(value) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def _check_choice(name: str, value, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataConfig(Config):
    """Where the tokens come from and how they are split (paths are checked by ``load_corpus``).

    Attributes:
      source: ``"stdlib"``, or a path to a file, a directory, a ``.npy`` or a ``.bin``.
      format: ``"auto"`` (by suffix: ``.npy``, ``.bin``, anything else bytes), ``"bytes"``,
        ``"npy"`` or ``"bin"``.
      bin_dtype: item type of a ``.bin`` file, ``"uint16"`` or ``"uint32"``.
      vocab_size: the model's vocabulary. Default: 256 (bytes), the character count (chars),
        or the largest id in the whole array + 1 (token arrays: all splits, because a val id
        outside the vocabulary would be silently clamped by the embedding lookup). A larger
        value is allowed (e.g. rounded up for speed); a smaller one raises.
      split: ``"fraction"`` or ``"enwik8"`` (90e6 / 5e6 / 5e6 bytes of one file).
      val_fraction: share of files (by path hash) or of the tail held out for validation.
      tokenizer: ``"bytes"`` or ``"chars"`` (text sources only).
      doc_separator: token id that ends each document in a token array.
    """

    source: str = "stdlib"
    format: str = "auto"
    bin_dtype: str = "uint16"
    vocab_size: int | None = None
    split: str = "fraction"
    val_fraction: float = 0.05
    tokenizer: str = "bytes"
    doc_separator: int | None = None

    def __post_init__(self):
        if not isinstance(self.source, str) or not self.source:
            raise ValueError(f"source must be 'stdlib' or a path (str), got {self.source!r}")
        _check_choice("format", self.format, ("auto", "bytes", "npy", "bin"))
        _check_choice("bin_dtype", self.bin_dtype, ("uint16", "uint32"))
        _check_choice("split", self.split, ("fraction", "enwik8"))
        _check_choice("tokenizer", self.tokenizer, ("bytes", "chars"))
        fraction = self.val_fraction
        if (
            not isinstance(fraction, int | float)
            or isinstance(fraction, bool)
            or not 0 < fraction < 1
        ):
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction!r}")
        if self.vocab_size is not None:
            _check_int("vocab_size", self.vocab_size, 1)
        if self.doc_separator is not None:
            _check_int("doc_separator", self.doc_separator, 0)


@dataclasses.dataclass
class Corpus:
    """Documents of each split and the tokenizer that made them.

    Attributes:
      train, val, test: documents, 1-D integer arrays (memmap views for mapped sources);
        ``test`` is empty unless ``split="enwik8"``. Every document has >= 2 tokens.
      vocab_size: ids are in ``[0, vocab_size)``.
      source: where the documents came from (for ``describe``).
      tokenizer: ``"bytes"``, ``"chars"`` or ``"ids"`` (token arrays).
      chars: the character vocabulary; id ``i`` is ``chars[i]`` (tokenizer ``"chars"``).
    """

    train: list[np.ndarray]
    val: list[np.ndarray]
    test: list[np.ndarray]
    vocab_size: int
    source: str = ""
    tokenizer: str = "bytes"
    chars: str = ""

    def decode(self, tokens) -> str:
        """Text of ``tokens`` [T] for printing; ids the tokenizer lacks show as U+FFFD."""
        ids = np.asarray(tokens).reshape(-1).astype(np.int64)
        if self.tokenizer == "ids":
            return " ".join(map(str, ids.tolist()))
        if self.tokenizer == "chars":
            n = len(self.chars)
            return "".join(self.chars[i] if 0 <= i < n else _UNKNOWN_CHAR for i in ids.tolist())
        # 0xFF never occurs in UTF-8, so an id that is not a byte decodes to U+FFFD.
        raw = np.where((ids >= 0) & (ids < 256), ids, 0xFF).astype(np.uint8)
        return raw.tobytes().decode("utf-8", errors="replace")

    def encode(self, text: str) -> np.ndarray:
        """Token ids int32 [T] of ``text`` (token arrays: whitespace-separated ids)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        if self.tokenizer == "bytes":
            return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)
        if self.tokenizer == "chars":
            index = {c: i for i, c in enumerate(self.chars)}
            unknown = index[_UNKNOWN_CHAR]
            return np.array([index.get(c, unknown) for c in text], np.int32)
        try:
            ids = np.array([int(word) for word in text.split()], np.int64)
        except ValueError:
            raise ValueError(
                f"text must be whitespace-separated token ids, got {text[:50]!r}"
            ) from None
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"text: ids must be in [0, {self.vocab_size}), got {ids.tolist()}")
        return ids.astype(np.int32)

    def describe(self) -> str:
        """One line: source, tokenizer, and documents / tokens per split."""
        parts = [
            f"{name} {len(docs):,} docs {sum(len(d) for d in docs):,} tokens"
            for name, docs in (("train", self.train), ("val", self.val), ("test", self.test))
        ]
        head = f"{self.source} ({self.tokenizer}, vocab {self.vocab_size})"
        return f"{head}: " + " | ".join(parts)


def stdlib_files() -> tuple[Path, list[str]]:
    """The standard library's root and its ``*.py`` files (relative POSIX paths, sorted)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return root, _walk(
        root, lambda name, is_dir: name != "site-packages" and (is_dir or name.endswith(".py"))
    )


def _walk(root: Path, keep) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):  # no symlinked dirs: no cycles
        dirnames[:] = [d for d in dirnames if keep(d, True)]
        found += [
            Path(dirpath, f).relative_to(root).as_posix() for f in filenames if keep(f, False)
        ]
    return sorted(found)


def _path_hash(name: str) -> float:
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") / 2**64


def hash_split(names: Sequence[str], val_fraction: float) -> tuple[list[str], list[str]]:
    """Splits file names into (train, val) by a stable hash of each name; val gets >= 1."""
    val = {n for n in names if _path_hash(n) < val_fraction}
    if not val and names:
        val = {min(names, key=_path_hash)}
    return [n for n in names if n not in val], [n for n in names if n in val]


def enwik8_split(data: np.ndarray, *, sizes: tuple[int, int, int] = ENWIK8_SPLIT, source=""):
    """(train, val, test) views: the first ``sizes[0]`` tokens, the next ``sizes[1]``, ..."""
    need = sum(sizes)
    if len(data) < need:
        raise ValueError(
            f"split='enwik8' needs a source of at least {need:,} bytes "
            f"({' + '.join(f'{s:,}' for s in sizes)}); {source or 'the data'} has {len(data):,}"
        )
    a, b = sizes[0], sizes[0] + sizes[1]
    return data[:a], data[a:b], data[b:need]


def _tail_split(data, val_fraction: float):
    n_val = max(2, round(len(data) * val_fraction))  # >= 1 target
    return data[: len(data) - n_val], data[len(data) - n_val :]


def _resolve_format(cfg: DataConfig) -> tuple[str, Path | None]:
    if cfg.source == "stdlib":
        if cfg.format not in ("auto", "bytes"):
            raise ValueError(f"format={cfg.format!r} does not apply to source='stdlib' (bytes)")
        return "stdlib", None
    path = Path(cfg.source)
    if not path.exists():
        raise FileNotFoundError(f"source: no such file or directory: {str(path)!r}")
    fmt = cfg.format
    if fmt == "auto":
        fmt = {".npy": "npy", ".bin": "bin"}.get(path.suffix.lower(), "bytes")
    if fmt in ("npy", "bin") and not path.is_file():
        raise ValueError(f"format={fmt!r} needs source to be a file, got directory {str(path)!r}")
    if path.is_file() and path.stat().st_size == 0:
        raise ValueError(f"source: file {str(path)!r} is empty")
    return fmt, path


def load_corpus(cfg: DataConfig) -> Corpus:
    """Reads ``cfg.source`` and splits it into documents (see the module docstring)."""
    if not isinstance(cfg, DataConfig):
        raise TypeError(f"cfg must be a DataConfig, got {type(cfg).__name__}")
    fmt, path = _resolve_format(cfg)
    tokens_source = fmt in ("npy", "bin")
    if tokens_source and cfg.tokenizer != "bytes":
        raise ValueError(f"tokenizer={cfg.tokenizer!r} applies to text; {fmt} holds token ids")
    if not tokens_source and cfg.doc_separator is not None:
        raise ValueError(f"doc_separator applies to .npy/.bin token arrays, not format {fmt!r}")
    single_file = path is not None and path.is_file()
    if cfg.split == "enwik8" and not (fmt == "bytes" and single_file):
        raise ValueError(f"split='enwik8' needs one bytes file as source, got {cfg.source!r}")
    if tokens_source:
        return _load_tokens(cfg, fmt, path)

    test = []
    if fmt == "stdlib" or not single_file:
        if fmt == "stdlib":
            root, names = stdlib_files()
        else:
            root, names = path, _walk(path, lambda name, is_dir: not name.startswith("."))
        if not names:
            raise ValueError(f"source: no files found under {str(root)!r}")
        if len(names) == 1:
            train, val = _tail_split(np.fromfile(root / names[0], np.uint8), cfg.val_fraction)
            train, val = [train], [val]
        else:
            train_names, val_names = hash_split(names, cfg.val_fraction)
            train = [np.fromfile(root / n, np.uint8) for n in train_names]
            val = [np.fromfile(root / n, np.uint8) for n in val_names]
    else:
        data = np.memmap(path, np.uint8, mode="r")
        if cfg.split == "enwik8":
            train, val, test = ([part] for part in enwik8_split(data, source=str(path)))
        else:
            train, val = ([part] for part in _tail_split(data, cfg.val_fraction))

    chars = ""
    if cfg.tokenizer == "chars":
        train, val, test, chars = _chars_tokenize(train, val, test)
    corpus = Corpus(
        train=_usable(train, "train", cfg.source),
        val=_usable(val, "val", cfg.source),
        test=_usable(test, "test", cfg.source) if test else [],
        vocab_size=len(chars) if chars else 256,
        source=str(cfg.source),
        tokenizer=cfg.tokenizer,
        chars=chars,
    )
    return _with_vocab(corpus, cfg.vocab_size)


def _usable(docs: list[np.ndarray], split: str, source) -> list[np.ndarray]:
    """Drops documents too short to hold one target; a split left empty is an error."""
    kept = [d for d in docs if len(d) >= 2]
    if not kept:
        raise ValueError(
            f"source {str(source)!r}: the {split} split has no usable tokens "
            "(no document of >= 2 tokens); use more data or a different val_fraction"
        )
    return kept


def _with_vocab(corpus: Corpus, vocab_size: int | None) -> Corpus:
    if vocab_size is not None:
        if vocab_size < corpus.vocab_size:
            raise ValueError(
                f"vocab_size={vocab_size} is smaller than the data needs ({corpus.vocab_size})"
            )
        corpus.vocab_size = vocab_size
    return corpus


def _chars_tokenize(*splits: list[np.ndarray]):
    texts = [[bytes(d).decode("utf-8", errors="replace") for d in docs] for docs in splits]
    alphabet = set(_UNKNOWN_CHAR)
    for text in texts[0]:
        alphabet |= set(text)
    chars = "".join(sorted(alphabet))
    codes = np.array([ord(c) for c in chars], np.int64)  # sorted, so searchsorted finds ids
    unknown = chars.index(_UNKNOWN_CHAR)
    dtype = np.uint16 if len(chars) <= 2**16 else np.int32

    def ids_of(text: str) -> np.ndarray:
        points = np.frombuffer(text.encode("utf-32-le"), np.uint32)
        ids = np.minimum(np.searchsorted(codes, points), len(codes) - 1)
        return np.where(codes[ids] == points, ids, unknown).astype(dtype)

    return (*([ids_of(t) for t in docs] for docs in texts), chars)


def _load_tokens(cfg: DataConfig, fmt: str, path: Path) -> Corpus:
    if fmt == "bin":
        itemsize = np.dtype(cfg.bin_dtype).itemsize
        if path.stat().st_size % itemsize:
            raise ValueError(
                f"source: {str(path)!r} has {path.stat().st_size} bytes, not a multiple of "
                f"{itemsize} (bin_dtype={cfg.bin_dtype!r})"
            )
        data = np.memmap(path, cfg.bin_dtype, mode="r")
    else:
        try:
            data = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as err:
            raise ValueError(f"source: {str(path)!r} is not a readable .npy array ({err})") from err
        if data.ndim != 1 or data.dtype.kind not in "iu" or data.size == 0:
            raise ValueError(
                f"source: {str(path)!r} must hold a non-empty 1-D integer array, "
                f"got {data.dtype} {data.shape}"
            )
    lowest, highest, cuts = _scan(data, cfg.doc_separator)
    if lowest < 0:
        raise ValueError(f"source: token ids must be >= 0, {str(path)!r} holds {lowest}")
    n_val = max(2, round(len(data) * cfg.val_fraction))  # >= 1 target
    bounds = {"train": (0, len(data) - n_val), "val": (len(data) - n_val, len(data))}
    docs = {}
    for split, (begin, end) in bounds.items():
        inner = cuts[(cuts > begin) & (cuts < end)]
        edges = [begin, *inner.tolist(), end]
        docs[split] = _usable([data[a:b] for a, b in itertools.pairwise(edges)], split, path)
    corpus = Corpus(
        train=docs["train"],
        val=docs["val"],
        test=[],
        vocab_size=highest + 1,
        source=str(path),
        tokenizer="ids",
    )
    return _with_vocab(corpus, cfg.vocab_size)


def _scan(data: np.ndarray, separator: int | None) -> tuple[int, int, np.ndarray]:
    """Smallest id, largest id, and document cut positions (after each separator), by chunks."""
    lowest, highest, cuts = None, None, []
    for start in range(0, len(data), _SCAN_CHUNK):
        chunk = np.asarray(data[start : start + _SCAN_CHUNK])
        low, high = int(chunk.min()), int(chunk.max())
        lowest = low if lowest is None else min(lowest, low)
        highest = high if highest is None else max(highest, high)
        if separator is not None:
            cuts.append(np.flatnonzero(chunk == separator) + start + 1)
    return lowest, highest, np.concatenate(cuts) if cuts else np.zeros(0, np.int64)


def _check_docs(docs) -> list[np.ndarray]:
    """The documents with >= 2 tokens (one input, one target); none at all is an error."""
    if isinstance(docs, np.ndarray) or not isinstance(docs, Sequence):
        raise ValueError(f"docs must be a list of 1-D integer arrays, got {type(docs).__name__}")
    kept = []
    for i, doc in enumerate(docs):
        doc = doc if isinstance(doc, np.ndarray) else np.asarray(doc)
        if doc.ndim != 1 or doc.dtype.kind not in "iu":
            raise ValueError(f"docs[{i}] must be a 1-D integer array, got {doc.dtype} {doc.shape}")
        if len(doc) >= 2:
            kept.append(doc)
    if not kept:
        raise ValueError(f"docs: none of the {len(docs)} documents has the 2 tokens a target needs")
    return kept


def _local_rows(batch_size, process_index, process_count) -> slice:
    _check_int("batch_size", batch_size, 1)
    _check_int("process_count", process_count, 1)
    if batch_size % process_count:
        raise ValueError(
            f"batch_size ({batch_size}) must be divisible by process_count ({process_count})"
        )
    if not _is_int(process_index) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")
    rows = batch_size // process_count
    return slice(process_index * rows, (process_index + 1) * rows)


def _empty_batch(rows: int, seq_len: int) -> dict[str, np.ndarray]:
    return {
        "tokens": np.zeros((rows, seq_len + 1), np.int32),  # [b, T + 1], pad id 0
        "loss_mask": np.zeros((rows, seq_len), bool),  # [b, T]
        "reset": np.ones(rows, bool),  # [b]
    }


def _put(batch: dict[str, np.ndarray], row: int, window: np.ndarray) -> None:
    batch["tokens"][row, : len(window)] = window
    batch["loss_mask"][row, : len(window) - 1] = True


def _segment_count(n_tokens, seq_len: int):
    """Segments needed for the ``n - 1`` targets of ``n`` tokens, ``seq_len`` per segment."""
    return -(-(np.asarray(n_tokens) - 1) // seq_len)


class WindowBatcher:
    """Random windows of ``seq_len + 1`` tokens, each from one document.

    A start is drawn uniformly from every window position of every document (a document
    shorter than a window offers one, padded). The whole global batch is drawn from
    ``(seed, step)`` and this process keeps its rows, so processes agree without talking.
    """

    def __init__(self, docs, *, batch_size, seq_len, seed, process_index=0, process_count=1):
        self._rows = _local_rows(batch_size, process_index, process_count)
        _check_int("seq_len", seq_len, 1)
        _check_int("seed", seed, 0)
        self._docs = _check_docs(docs)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        lengths = np.array([len(d) for d in self._docs], np.int64)
        self._starts = np.maximum(lengths - seq_len, 1)  # window positions per document
        self._ends = np.cumsum(self._starts)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the batch of ``step`` (see the module docstring)."""
        _check_int("step", step, 0)
        rng = np.random.default_rng([self.seed, step])
        picks = rng.integers(0, self._ends[-1], size=self.batch_size)[self._rows]
        doc_ids = np.searchsorted(self._ends, picks, side="right")
        offsets = picks - (self._ends[doc_ids] - self._starts[doc_ids])
        batch = _empty_batch(len(picks), self.seq_len)
        for row, (d, offset) in enumerate(zip(doc_ids, offsets, strict=True)):
            _put(batch, row, self._docs[d][offset : offset + self.seq_len + 1])
        return batch


def _deal(docs: list[np.ndarray], batch_size: int, seq_len: int) -> list[list[tuple]]:
    """Pieces ``(doc, start, end)`` for each global row, in the order the row reads them."""
    rows = [[] for _ in range(batch_size)]
    if len(docs) >= batch_size:
        # Whole documents, each to the row with the fewest segments so far (ties: the lowest
        # row), so that rows finish an epoch at about the same step.
        loads = [(0, r) for r in range(batch_size)]
        for i, doc in enumerate(docs):
            load, r = heapq.heappop(loads)
            rows[r].append((i, 0, len(doc)))
            heapq.heappush(loads, (load + int(_segment_count(len(doc), seq_len)), r))
        return rows
    # Fewer documents than rows (enwik8 is one): the documents laid end to end are cut into
    # batch_size equal stripes. A stripe also reads the first token of the next one, so the
    # target across each cut is kept and every target is read exactly once.
    doc_starts = np.cumsum([0] + [len(d) for d in docs])
    edges = [int(doc_starts[-1]) * r // batch_size for r in range(batch_size + 1)]
    for r in range(batch_size):
        for i in range(len(docs)):
            begin = max(edges[r], doc_starts[i])
            end = min(edges[r + 1] + 1, doc_starts[i + 1])
            if end - begin >= 2:
                rows[r].append((i, int(begin - doc_starts[i]), int(end - doc_starts[i])))
    return rows


class StreamBatcher:
    """Rows that continue from step to step, for models with recurrent state (XL, RMT, ...).

    Each row reads its pieces of documents in order, ``seq_len`` targets per step; the last
    token of step ``t`` is the first of step ``t + 1``. A piece's last segment is padded and
    the next piece starts on the next step with ``reset=True``. With ``loop=True`` each row
    starts over from its first piece when it runs out; ``steps_per_epoch`` is the number of
    steps the longest row needs. Each row's cumulative segment counts make ``batch(step)`` a
    binary search per row, with no walk over earlier steps.
    """

    def __init__(self, docs, *, batch_size, seq_len, process_index=0, process_count=1, loop=True):
        rows = _local_rows(batch_size, process_index, process_count)
        _check_int("seq_len", seq_len, 1)
        self._docs = _check_docs(docs)
        self.batch_size, self.seq_len, self.loop = batch_size, seq_len, bool(loop)
        self._schedule = []  # per local row: piece docs, starts, ends, cumulative segments
        self.steps_per_epoch = 0
        for r, pieces in enumerate(_deal(self._docs, batch_size, seq_len)):
            if not pieces:
                raise ValueError(
                    f"docs: {sum(len(d) for d in self._docs)} tokens are too few to give each "
                    f"of batch_size={batch_size} rows 2 tokens"
                )
            doc, start, end = (np.array(column, np.int64) for column in zip(*pieces, strict=True))
            seg_ends = np.cumsum(_segment_count(end - start, seq_len))
            self.steps_per_epoch = max(self.steps_per_epoch, int(seg_ends[-1]))
            if rows.start <= r < rows.stop:
                self._schedule.append((doc, start, end, seg_ends))

    def batch(self, step: int) -> dict[str, np.ndarray]:
        """This process's rows of the batch of ``step`` (see the module docstring)."""
        _check_int("step", step, 0)
        if not self.loop and step >= self.steps_per_epoch:
            raise ValueError(
                f"step {step} is past the end of the data (steps_per_epoch="
                f"{self.steps_per_epoch}) and loop=False"
            )
        batch = _empty_batch(len(self._schedule), self.seq_len)
        for row, (doc, start, end, seg_ends) in enumerate(self._schedule):
            if step >= seg_ends[-1] and not self.loop:
                continue  # this row has finished: padding
            s = step % seg_ends[-1]
            p = np.searchsorted(seg_ends, s, side="right")
            k = s - (seg_ends[p - 1] if p else 0)  # segment within piece p
            begin = start[p] + k * self.seq_len
            _put(batch, row, self._docs[doc[p]][begin : min(begin + self.seq_len + 1, end[p])])
            batch["reset"][row] = k == 0
        return batch


def eval_batches(
    docs, *, batch_size, seq_len, max_batches=None, process_index=0, process_count=1
) -> Iterator[dict[str, np.ndarray]]:
    """Non-overlapping windows over ``docs`` from the start, every target read once.

    Windows go document by document, ``seq_len`` targets each (consecutive windows share one
    token); the last batch is padded with ``loss_mask`` False. Every row has ``reset`` True:
    each window is scored on its own.

    Args:
      docs: documents, 1-D integer arrays.
      batch_size: rows per global batch; this process yields its own rows.
      seq_len: targets per window.
      max_batches: stop after this many batches (``None``: the whole split).
      process_index, process_count: as for the batchers.

    Returns:
      An iterator of batch dicts (see the module docstring).
    """
    rows = _local_rows(batch_size, process_index, process_count)
    _check_int("seq_len", seq_len, 1)
    if max_batches is not None:
        _check_int("max_batches", max_batches, 1)
    docs = _check_docs(docs)
    return _eval_iterator(docs, batch_size, seq_len, max_batches, rows)


def _eval_iterator(docs, batch_size, seq_len, max_batches, rows):
    windows = (
        doc[begin : begin + seq_len + 1]
        for doc in docs
        for begin in range(0, len(doc) - 1, seq_len)
    )
    done = 0
    while max_batches is None or done < max_batches:
        chunk = list(itertools.islice(windows, batch_size))
        if not chunk:
            return
        batch = _empty_batch(batch_size, seq_len)
        for row, window in enumerate(chunk):
            _put(batch, row, window)
        yield {name: value[rows] for name, value in batch.items()}
        done += 1
