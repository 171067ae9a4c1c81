"""``jaxprop-sample --out RUN``: text from a trained character model, and the runner's text parts.

Sampling (temperature tau; tau = 0 is greedy)::

    logits = net(last T ids)[position of the last id]          T = the run's context
    next   ~ softmax(logits / tau)

The forward only, one jitted program for the whole sample (a ``lax.fori_loop``
over the characters). The window always has the run's shape (1, T): while
fewer than T ids exist they sit at the start and the rest is padding, which
a causal model (GPT, a forward RNN) never reads, so one compilation serves
every step. The run folder gives the model spec (config.json), the
vocabulary (vocab.json) and the parameters (the latest checkpoint).

The runner's text parts live here too: :func:`sync_vocab` (vocab.json, checked
on resume), :func:`text_metrics` (bits per character and the n-gram
baselines in summary.json) and :func:`write_sample` (sample.txt at the end
of a run).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxprop import checkpoint as ckpt
from jaxprop import text as text_mod
from jaxprop.core import call_forward
from jaxprop.runner.models import build_model

VOCAB_FILE = "vocab.json"
SAMPLE_FILE = "sample.txt"
DEFAULT_LENGTH = 500
DEFAULT_TEMPERATURE = 0.8


# --------------------------------------------------------------------------- the runner's text parts

def is_text(ds) -> bool:
    return getattr(ds, "vocab", None) is not None and ds.stream is not None


def model_keywords(ds) -> dict:
    """``build_model`` keywords for a data set: ``vocab_size`` and ``context`` for text, none otherwise."""
    return {"vocab_size": ds.vocab.size, "context": ds.context} if is_text(ds) else {}


def sync_vocab(out: str, ds) -> str:
    """Write ``out/vocab.json`` (characters, the text's SHA-256, context), or
    check it against ``ds`` when it exists (a resumed run): a different
    vocabulary or text is a ValueError, since the ids would change meaning."""
    path = os.path.join(out, VOCAB_FILE)
    sha = ds.source.get("sha256")
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        if saved.get("chars") != ds.vocab.chars or saved.get("sha256") != sha:
            raise ValueError(f"{path}: the data set's text or vocabulary differs from the one this run "
                             f"started with (sha256 {saved.get('sha256')}, now {sha}); the token ids would "
                             "change meaning, so the run cannot continue on it")
        return path
    ds.vocab.save(path, sha256=sha, context=ds.context, dataset=ds.name)
    return path


def text_metrics(ds, history: list) -> dict:
    """summary.json's text entries: final / best test bits per character
    (mean cross-entropy / ln 2 over every scored test position), the train
    bpc, the add-one n-gram baselines on the same positions, and the split."""
    ev = ds.test_name
    rows = [r for r in history if r.get(f"{ev}_loss") is not None]
    last = rows[-1] if rows else {}
    best = min(rows, key=lambda r: r[f"{ev}_loss"]) if rows else {}
    bpc = text_mod.bits_per_char
    out = {f"final_{ev}_bpc": bpc(last.get(f"{ev}_loss")), f"best_{ev}_bpc": bpc(best.get(f"{ev}_loss")),
           f"best_{ev}_bpc_step": best.get("step"), "final_train_bpc": bpc(last.get("train_loss")),
           "context": ds.context, "vocab_size": ds.vocab.size,
           "scored_positions": int(ds.y_test.size), "n_train_chars": int(len(ds.stream))}
    out.update(ds.baselines)                 # scored on the same positions as the model
    return out


def write_sample(out: str, net, params, ds, *, length: int = DEFAULT_LENGTH,
                 temperature: float = DEFAULT_TEMPERATURE, seed: int = 0, prompt: Optional[str] = None) -> str:
    """Sample ``length`` characters from the trained model into ``out/sample.txt``; returns the text."""
    text = sample(net, params, ds.vocab, ds.context, length=length, temperature=temperature, seed=seed,
                  prompt=prompt)
    ckpt.atomic_write(os.path.join(out, SAMPLE_FILE), lambda f: f.write(text))
    return text


# --------------------------------------------------------------------------- sampling

def _default_prompt(vocab) -> str:
    return "\n" if "\n" in vocab.chars else vocab.chars[0]


def _generator(net, context: int, n_prompt: int, length: int, greedy: bool):
    """Jitted ``(params, buf, key, temperature) -> buf``: fills ``buf[n_prompt:n_prompt+length]``."""

    def generate(params, buf, key, temperature):
        def body(i, carry):
            buf, key = carry
            n = n_prompt + i                                   # ids so far
            start = jnp.maximum(n - context, 0)
            window = jax.lax.dynamic_slice_in_dim(buf, start, context)[None, :]      # (1, T)
            logits, _ = call_forward(net, params, window, train=False)
            last = jax.lax.dynamic_index_in_dim(logits[0], n - 1 - start, keepdims=False)    # (V,)
            key, sub = jax.random.split(key)
            nxt = jnp.argmax(last) if greedy else jax.random.categorical(sub, last / temperature)
            return jax.lax.dynamic_update_index_in_dim(buf, nxt.astype(buf.dtype), n, 0), key

        buf, _ = jax.lax.fori_loop(0, length, body, (buf, key))
        return buf

    return jax.jit(generate)


def sample(net, params, vocab, context: int, *, length: int = DEFAULT_LENGTH,
           temperature: float = DEFAULT_TEMPERATURE, seed: int = 0, prompt: Optional[str] = None) -> str:
    """``prompt`` followed by ``length`` sampled characters (see the module
    docstring). ``prompt`` defaults to a newline; ``temperature`` 0 is greedy."""
    if not isinstance(length, int) or length < 0:
        raise ValueError(f"sample: length must be an int >= 0, got {length!r}")
    if temperature < 0:
        raise ValueError(f"sample: temperature must be >= 0 (0: greedy), got {temperature}")
    prompt = _default_prompt(vocab) if prompt is None or prompt == "" else prompt
    ids = vocab.encode(prompt)
    if length == 0:
        return prompt
    buf = np.zeros(len(ids) + length + context, np.int32)
    buf[:len(ids)] = ids
    gen = _generator(net, int(context), len(ids), length, temperature == 0)
    out = gen(params, jnp.asarray(buf), jax.random.key(seed), jnp.float32(temperature or 1.0))
    return prompt + vocab.decode(np.asarray(out)[len(ids):len(ids) + length])


def load_run(out: str, step: Optional[int] = None):
    """``(net, params, vocab, context, config)`` of the run folder ``out``: the
    model of its config.json, the parameters of its latest checkpoint (or
    of ``step``), its vocab.json."""
    paths = {k: os.path.join(out, f) for k, f in (("config", "config.json"), ("vocab", VOCAB_FILE))}
    for what, path in paths.items():
        if not os.path.exists(path):
            raise ValueError(f"jaxprop-sample: {out} has no {os.path.basename(path)}"
                             + (" (is it a run of a text data set?)" if what == "vocab" else ""))
    with open(paths["config"], encoding="utf-8") as f:
        config = json.load(f)
    with open(paths["vocab"], encoding="utf-8") as f:
        vocab_json = json.load(f)
    vocab = text_mod.Vocabulary.from_json(vocab_json)
    resolved = config["resolved"]
    context = int(resolved.get("context") or vocab_json["context"])
    net = build_model(resolved["model"], int(config["n_outputs"]), vocab_size=vocab.size, context=context)
    directory = os.path.join(out, "checkpoints")
    path = ckpt.path_for(directory, step) if step is not None else ckpt.latest(directory)
    if path is None or not os.path.exists(path):
        raise ValueError(f"jaxprop-sample: no checkpoint {'of step ' + str(step) + ' ' if step else ''}"
                         f"in {directory}")
    dtype = resolved.get("dtype", "float32")
    if dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    template = jax.eval_shape(lambda k: net.init(k, (1, context))[1], jax.random.key(0))
    template = jax.tree_util.tree_map(lambda s: jax.ShapeDtypeStruct(s.shape, dtype)
                                      if jnp.issubdtype(s.dtype, jnp.floating) else s, template)
    trees, _ = ckpt.restore(path, {"params": template})
    return net, jax.tree_util.tree_map(jnp.asarray, trees["params"]), vocab, context, config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxprop-sample",
                                description="Print text sampled from a character model trained by jaxprop-train.")
    a = p.add_argument
    a("--out", required=True, help="the run folder (jaxprop-train --out)")
    a("--length", type=int, default=DEFAULT_LENGTH, help=f"characters to sample (default {DEFAULT_LENGTH})")
    a("--temperature", type=float, default=DEFAULT_TEMPERATURE,
      help=f"softmax temperature (default {DEFAULT_TEMPERATURE}; 0: greedy, the most likely character)")
    a("--prompt", default=None, help="text to continue (default: a newline)")
    a("--seed", type=int, default=0, help="sampling seed (default 0)")
    a("--step", type=int, default=None, help="the checkpoint's step (default: the latest)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        net, params, vocab, context, _ = load_run(args.out, args.step)
        text = sample(net, params, vocab, context, length=args.length, temperature=args.temperature,
                      seed=args.seed, prompt=args.prompt)
    except (ValueError, ImportError) as e:
        print(f"jaxprop-sample: error: {e}", file=sys.stderr)
        return 2
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
