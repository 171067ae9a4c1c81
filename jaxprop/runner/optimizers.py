"""The runner's optimizer: any optax alias by name, with a learning-rate schedule over the run,
optionally after gradient clipping (``--clip-norm``).

``--opt-args mask=matrices`` (for ``adamw`` and the other optimizers with a
``mask`` argument) applies weight decay to the weight matrices only: leaves
named ``w...`` (``w``, ``wq``, ``w_ih``, ...) with two or more axes -- not
biases, layer-norm scales and offsets (GPT-2's recipe). The schedules end at
``--end-lr`` (default 0).
"""
from __future__ import annotations

import jax
import optax

SCHEDULES = ("constant", "cosine", "warmup_cosine", "linear", "exponential")


def parse_opt_args(text: str) -> dict:
    """``"momentum=0.9,nesterov=true"`` -> ``{"momentum": 0.9, "nesterov": True}``
    (ints, floats, true/false, none/null; anything else stays a string)."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"--opt-args: expected key=value, got {item!r}")
        low = value.lower()
        if low in ("true", "false"):
            out[key] = low == "true"
        elif low in ("none", "null"):
            out[key] = None
        else:
            try:
                out[key] = int(value)
            except ValueError:
                try:
                    out[key] = float(value)
                except ValueError:
                    out[key] = value
    return out


def schedule(cfg: dict):
    """The learning rate over ``cfg["steps"]`` steps: a float, or an optax schedule."""
    lr, steps = float(cfg["lr"]), int(cfg["steps"])
    end = float(cfg.get("end_lr") or 0.0)          # cosine, warmup_cosine and linear end there
    name = cfg["schedule"]
    if name == "constant":
        return lr
    if name == "cosine":
        return optax.cosine_decay_schedule(lr, decay_steps=steps, alpha=end / lr if lr else 0.0)
    if name == "warmup_cosine":
        return optax.warmup_cosine_decay_schedule(0.0, lr, int(cfg["warmup_steps"]), steps, end_value=end)
    if name == "linear":
        return optax.linear_schedule(lr, end, steps)
    if name == "exponential":
        return optax.exponential_decay(lr, transition_steps=steps, decay_rate=0.01)
    raise ValueError(f"--schedule: unknown schedule {name!r}; choose one of {SCHEDULES}")


def matrices(params):
    """The weight-decay mask of ``mask=matrices``: True for leaves named ``w...``
    with at least two axes (weights, embeddings), False for the rest."""
    def is_matrix(path, leaf):
        key = getattr(path[-1], "key", None) if path else None
        return isinstance(key, str) and key.startswith("w") and getattr(leaf, "ndim", 0) >= 2
    return jax.tree_util.tree_map_with_path(is_matrix, params)


MASKS = {"matrices": matrices, "all": None}


def make_optimizer(cfg: dict) -> optax.GradientTransformation:
    """The optax optimizer ``optax.<optimizer>(learning_rate=schedule, **opt_args)``
    of a resolved runner config (keys optimizer, lr, steps, schedule,
    warmup_steps, opt_args; optional end_lr, clip_norm), after
    ``optax.clip_by_global_norm(clip_norm)`` when clip_norm > 0."""
    lr = schedule(cfg)
    name = cfg["optimizer"]
    opt_args = dict(cfg["opt_args"])
    if isinstance(opt_args.get("mask"), str):
        if opt_args["mask"] not in MASKS:
            raise ValueError(f"--opt-args mask={opt_args['mask']}: choose one of {sorted(MASKS)}")
        opt_args["mask"] = MASKS[opt_args["mask"]]
    factory = getattr(optax, name, None)
    if name.startswith("_") or not callable(factory):
        raise ValueError(f"--optimizer: optax has no optimizer {name!r} (try adam, adamw, sgd, lamb, "
                         "rmsprop, lion, ...)")
    try:
        tx = factory(learning_rate=lr, **opt_args)
    except TypeError as e:
        raise ValueError(f"--optimizer {name}: {e}") from None
    if not (hasattr(tx, "init") and hasattr(tx, "update")):
        raise ValueError(f"--optimizer: optax.{name} is not an optimizer (no init/update)")
    clip = float(cfg.get("clip_norm") or 0.0)
    if clip < 0:
        raise ValueError(f"--clip-norm must be >= 0 (0: no clipping), got {clip}")
    return optax.chain(optax.clip_by_global_norm(clip), tx) if clip else tx
