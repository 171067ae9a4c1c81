"""The runner's DP-SGD options: ``--dp-clip C --dp-noise SIGMA --dp-delta DELTA``.

With ``--dp-clip`` the run trains with DP-SGD (Abadi et al. 2016) from the
hand-written backward (:mod:`jaxprop.per_example`): each step's gradient is
the mean of the per-example gradients clipped to L2 norm C
(:class:`~jaxprop.per_example.ClippedGrad`: a norms sweep and one reweighted
backward, no per-example gradient formed), and the optimizer first adds
N(0, (C sigma / B)^2) per coordinate (:func:`~jaxprop.per_example.dp_noise`,
its key checkpointed with the optimizer state, so ``--resume`` draws the same
noise). That is optax's ``differentially_private_aggregate`` followed by the
chosen optimizer. ``summary.json`` gets ``dp_epsilon`` at ``dp_delta`` from
``dp-accounting``'s RDP accountant for sampling rate q = B / N_train and the
steps run (Poisson sampling assumed; the runner's shuffled fixed-size
batches are the usual approximation), or null with ``dp_epsilon_error`` when
dp-accounting is not installed.
"""
from __future__ import annotations

import math

import jax
import optax

from jaxprop.runner.checks import UsageError

DEFAULT_NOISE = 1.0
DEFAULT_DELTA = 1e-5
_NOISE_KEY = 0xD9          # folded into the run's seed: the noise key, apart from init/data/dropout keys


def add_options(parser) -> None:
    """The ``--dp-*`` options, as their own group."""
    g = parser.add_argument_group("differential privacy (DP-SGD, jaxprop.per_example)")
    g.add_argument("--dp-clip", type=float, default=None, metavar="C",
                   help="train with DP-SGD: clip each example's gradient to this L2 norm (default: off)")
    g.add_argument("--dp-noise", type=float, default=None, metavar="SIGMA",
                   help=f"DP-SGD noise multiplier: std = SIGMA * C on the clipped sum (default {DEFAULT_NOISE})")
    g.add_argument("--dp-delta", type=float, default=None, metavar="DELTA",
                   help=f"the delta at which summary.json reports epsilon (default {DEFAULT_DELTA})")
    g.add_argument("--dp-chunk-size", type=int, default=None, metavar="K",
                   help="run the per-example sweep over sequential chunks of K examples of each batch: "
                        "less memory, the same gradients to rounding (default: the whole batch at once)")


def check(cfg: dict) -> None:
    """Values of the ``--dp-*`` options (a UsageError naming the option)."""
    clip, noise, delta = cfg.get("dp_clip"), cfg.get("dp_noise"), cfg.get("dp_delta")
    chunk = cfg.get("dp_chunk_size")
    if clip is None:
        if noise is not None or delta is not None or chunk is not None:
            raise UsageError("--dp-noise, --dp-delta and --dp-chunk-size need --dp-clip C (DP-SGD is off without it)")
        return
    if chunk is not None and chunk < 1:
        raise UsageError(f"--dp-chunk-size must be a positive number of examples, got {chunk!r}")
    if not (math.isfinite(clip) and clip > 0):
        raise UsageError(f"--dp-clip must be a positive number (the per-example L2 norm bound), got {clip!r}")
    if noise is not None and not (math.isfinite(noise) and noise >= 0):
        raise UsageError(f"--dp-noise must be a number >= 0, got {noise!r}")
    if delta is not None and not 0 < delta < 1:
        raise UsageError(f"--dp-delta must be in (0, 1), got {delta!r}")
    if cfg.get("grad", "hand") != "hand":
        raise UsageError("--dp-clip needs --grad hand (DP-SGD runs on the hand-written per-example rules)")


def setup(cfg: dict, tx):
    """``(grad, tx)`` for :func:`jaxprop.train.fit`: ``cfg["grad"]`` and ``tx``
    unchanged without ``--dp-clip``; else the clipped-mean gradient and
    ``chain(dp_noise, tx)``. Fills the defaults of ``dp_noise``/``dp_delta``
    into ``cfg`` (so config.json records them)."""
    check(cfg)
    if cfg.get("dp_clip") is None:
        return cfg["grad"], tx
    from jaxprop import per_example as pe
    cfg["dp_noise"] = DEFAULT_NOISE if cfg.get("dp_noise") is None else cfg["dp_noise"]
    cfg["dp_delta"] = DEFAULT_DELTA if cfg.get("dp_delta") is None else cfg["dp_delta"]
    key = jax.random.fold_in(jax.random.key(cfg["seed"]), _NOISE_KEY)
    noise = pe.dp_noise(cfg["dp_clip"], cfg["dp_noise"], cfg["batch_size"], key)
    return pe.ClippedGrad(cfg["dp_clip"], cfg.get("dp_chunk_size")), optax.chain(noise, tx)


def summary(cfg: dict, n_train: int, steps: int) -> dict:
    """summary.json's DP entries (empty without ``--dp-clip``)."""
    if cfg.get("dp_clip") is None:
        return {}
    from jaxprop import per_example as pe
    q = min(1.0, cfg["batch_size"] / n_train)
    out = {"dp_clip": cfg["dp_clip"], "dp_noise": cfg["dp_noise"], "dp_delta": cfg["dp_delta"],
           "dp_sampling_rate": q, "dp_steps": int(steps), "dp_accountant": "rdp (dp-accounting), Poisson sampling"}
    try:
        eps = pe.epsilon(cfg["dp_noise"], q, int(steps), cfg["dp_delta"])
        out["dp_epsilon"] = eps if math.isfinite(eps) else None      # JSON has no inf: null, see the error
        if not math.isfinite(eps):
            out["dp_epsilon_error"] = "no noise (--dp-noise 0): no privacy guarantee"
    except ImportError as e:
        out["dp_epsilon"], out["dp_epsilon_error"] = None, str(e)
    return out
