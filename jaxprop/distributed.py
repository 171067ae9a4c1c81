r"""Many devices and hosts through JAX's own SPMD machinery: meshes, shardings, ``jit``.

jaxprop adds no communication of its own. The training step is the step of
:func:`jaxprop.train.make_train_step` (the one step of jaxprop, also
:func:`jaxprop.train.fit`'s), compiled by one ``jax.jit``; this
module only tells ``jax.jit`` where every input and output lives
(``in_shardings`` / ``out_shardings``) and XLA's SPMD partitioner does the
rest::

    mesh = jaxprop.distributed.make_mesh()                   # all devices on the "data" axis
    step = jaxprop.distributed.data_parallel_step(jp.value_and_grad(net, loss), tx, mesh)
    params, opt_state = jaxprop.distributed.replicate((params, opt_state), mesh)
    x, y = jaxprop.distributed.shard_batch((x, y), mesh)     # this process's rows
    params, opt_state, value = step(params, opt_state, x, y)

Data parallelism. The batch (N, ...) is split along its first axis over the
mesh axis ``"data"`` (D devices, N / D rows each); parameters and optimizer
state are replicated. The hand-written cost is written for the *global*
batch -- ``J = (1/N) sum_n l_n`` and, for a dense layer,
``dW = X^T dY = sum_d X_d^T dY_d`` -- so when X and dY are sharded by rows
the partitioner computes each device's partial sum ``X_d^T dY_d`` locally and
adds them with one all-reduce over ``"data"``: the gradient all-reduce of data
parallelism, derived by the compiler from the math, not written by us.
Because the semantics stay global, the sharded step computes the same numbers
as the single-device step (up to the order of floating-point sums), and
batch statistics (batch norm) are taken over the global batch.

Tensor parallelism (optional, ``model=M`` in :func:`make_mesh`). A second
mesh axis ``"model"`` may hold slices of wide weights: :func:`param_shardings`
shards the last (output) axis of every weight whose last dimension is a
multiple of M and at least ``min_features`` (column parallelism: W (I, O) ->
M blocks (I, O/M), b (O,) -> (O/M,)); the same rule applies to the optimizer
state, whose leaves mirror the parameters. The hand-written backward needs no
change: ``dX = dY W^T`` contracts over the sharded O axis (the partitioner
adds a reduction over ``"model"``), ``dW = X^T dY`` comes out sharded like W.
Any sharding gives the same numbers; the choice changes only communication.

Several hosts. Every process runs the same program; call :func:`initialize`
(``jax.distributed.initialize``) first, build the mesh over all global
devices, let each process load only its rows of every global batch
(:func:`process_rows`) and assemble global arrays with :func:`shard_batch`.
Replicated outputs are read with :func:`to_host`; only the process where
:func:`is_primary` is true writes checkpoints and summaries.

Steps in flight on CPU. Wait for a step's result (``jax.block_until_ready``)
at least every 16 steps when the devices are CPU devices -- emulated ones
(``--xla_force_host_platform_device_count``) or several per process.
XLA:CPU runs every device's part of a step on one shared pool of
max(cores, devices) threads; a step dispatched while its device already
has 32 computations queued holds a pool thread until one finishes, and the
gradient all-reduce needs every device's thread at once, so a loop that
dispatches more than 32 steps without waiting can deadlock ("Termination
timeout for 'all reduce'"). :func:`jaxprop.train.fit` waits every
``jaxprop.train.loop.STEPS_IN_FLIGHT`` (16) steps.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, Optional, Sequence, Union

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxprop.train.step import check_step_args, make_train_step, step_kind

DATA = "data"
MODEL = "model"

PyTree = Any


# --------------------------------------------------------------------------- processes

def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, **kwargs) -> None:
    """Join a multi-process run: ``jax.distributed.initialize`` with the same arguments.

    Call it first, before any JAX computation, in every process. Arguments
    left ``None`` are detected by JAX where it can (Slurm, Open MPI, TPU pods,
    Kubernetes; ``JAX_COORDINATOR_ADDRESS`` for the address). On a plain set
    of machines give all three: ``coordinator_address="HOST0:PORT"`` (process
    0's address, the same in every process), ``num_processes`` and this
    process's ``process_id`` in ``0 .. num_processes - 1``. Extra keywords
    (``local_device_ids``, ``initialization_timeout``,
    ``coordinator_bind_address``, ...) are passed through unchanged.
    """
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id, **kwargs)


def is_primary() -> bool:
    """True in process 0 only: the one process that writes checkpoints and summaries."""
    return jax.process_index() == 0


# --------------------------------------------------------------------------- meshes and shardings

def make_mesh(devices: Union[int, Sequence, None] = None, *, model: int = 1) -> Mesh:
    """A ``(data, model)`` device mesh with automatic (partitioner-chosen) axes.

    Args:
      devices: ``None`` for every global device (all processes), an int ``n``
        for the first ``n`` of ``jax.devices()``, or a sequence of devices.
      model: size of the ``"model"`` axis (tensor parallelism); 1 (default)
        puts every device on the ``"data"`` axis.

    Returns a :class:`jax.sharding.Mesh` of shape ``(n // model, model)`` with
    axis names ``("data", "model")``. Both axes are of type ``Auto``: XLA's
    partitioner propagates shardings and inserts the collectives.
    """
    all_devices = jax.devices()
    if devices is None:
        devs = list(all_devices)
    elif isinstance(devices, (int, np.integer)):
        if not 1 <= int(devices) <= len(all_devices):
            raise ValueError(f"make_mesh: asked for {int(devices)} devices, but JAX sees "
                             f"{len(all_devices)} ({all_devices[0].platform}); on CPU, emulate more with "
                             "XLA_FLAGS=--xla_force_host_platform_device_count=N set before JAX starts")
        devs = list(all_devices[:int(devices)])
    else:
        devs = list(devices)
        if not devs:
            raise ValueError("make_mesh: got an empty device list")
    n = len(devs)
    if (jax.process_count() > 1 and devs[0].platform == "cpu"
            and len({d.id for d in devs if d.process_index == jax.process_index()}) > 1):
        warnings.warn("make_mesh: several CPU devices per process in a multi-process run; with "
                      "JAX 0.10's CPU collectives this can hang when many steps are dispatched "
                      "without waiting for results (see docs/scaling.md); use one CPU device per "
                      "process", RuntimeWarning, stacklevel=2)
    if not isinstance(model, (int, np.integer)) or model < 1 or n % model:
        raise ValueError(f"make_mesh: model axis size {model!r} must be a positive divisor of the "
                         f"number of devices ({n})")
    shape = (n // int(model), int(model))
    try:                                    # topology-aware order on TPU/GPU slices
        from jax.experimental import mesh_utils
        grid = mesh_utils.create_device_mesh(shape, devs)
    except Exception:                       # any other device set: the order given
        grid = np.array(devs, dtype=object).reshape(shape)
    return Mesh(grid, (DATA, MODEL))


def data_size(mesh: Mesh) -> int:
    """Number of devices on the ``"data"`` axis (D): the batch is split D ways."""
    return int(mesh.shape[DATA])


def model_size(mesh: Mesh) -> int:
    """Number of devices on the ``"model"`` axis (1 without tensor parallelism)."""
    return int(mesh.shape.get(MODEL, 1))


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Rows (first axis) split over ``"data"``, everything else whole: ``P("data")``."""
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh: ``P()``."""
    return NamedSharding(mesh, P())


def leaf_spec(shape, mesh: Mesh, *, min_features: int = 128) -> P:
    """The partition spec of one parameter-like array under tensor parallelism.

    Rank-1 and rank-2 arrays whose last dimension is a multiple of the
    ``"model"`` axis size M (M > 1) and at least ``min_features`` are split
    along that last axis (``P(None, "model")`` / ``P("model")``); everything
    else (scalars, small or indivisible arrays, M = 1) is replicated.
    """
    m = model_size(mesh)
    shape = tuple(shape)
    if m > 1 and len(shape) in (1, 2) and shape[-1] % m == 0 and shape[-1] >= min_features:
        return P(*([None] * (len(shape) - 1)), MODEL)
    return P()


def param_shardings(tree: PyTree, mesh: Mesh, *, tensor_parallel: bool = False,
                    min_features: int = 128) -> PyTree:
    """A pytree of :class:`NamedSharding` for ``tree`` (params or optimizer state).

    Without ``tensor_parallel`` every leaf is replicated. With it, each leaf
    follows :func:`leaf_spec` -- a rule on shapes only, so the optimizer
    state's moments (same shapes as the params) are split exactly like the
    params they belong to.
    """
    def one(leaf):
        if not tensor_parallel:
            return replicated(mesh)
        return NamedSharding(mesh, leaf_spec(np.shape(leaf), mesh, min_features=min_features))

    return jax.tree_util.tree_map(one, tree)


# --------------------------------------------------------------------------- batch sizes

def check_batch(global_batch: int, mesh: Mesh) -> int:
    """Return the per-device batch ``global_batch / D``; raise when it does not divide.

    D is the ``"data"`` axis size. With several processes the global batch
    must also split evenly over the processes (each loads the same number of rows).
    """
    d = data_size(mesh)
    b = int(global_batch)
    if b < 1 or b % d:
        lo, hi = max(d, b // d * d), (b // d + 1) * d
        hint = f"{lo}" if lo == hi else f"{lo} or {hi}"
        raise ValueError(f"the global batch size {b} does not divide across the {d} devices of the "
                         f"mesh's '{DATA}' axis (per-device batch {b / d:g}); choose a multiple of {d}, "
                         f"e.g. {hint}, or use fewer devices")
    return b // d


def batch_sizes(global_batch: int, mesh: Mesh) -> dict:
    """The sizes a run reports (summary.json): devices, processes, global and
    per-device (and per-process) batch sizes. Raises like :func:`check_batch`."""
    per_device = check_batch(global_batch, mesh)
    n_proc = len({d.process_index for d in mesh.devices.flat})
    return {"devices": int(mesh.devices.size), "processes": n_proc,
            "mesh": {name: int(size) for name, size in mesh.shape.items()},
            "global_batch_size": int(global_batch), "per_device_batch_size": per_device,
            "per_process_batch_size": int(global_batch) // n_proc}


def process_rows(global_batch: int, mesh: Mesh) -> slice:
    """The rows ``[start, stop)`` of each global batch that *this* process loads.

    Every process draws the same global batch indices (same seed), keeps
    ``indices[process_rows(B, mesh)]`` and reads only those examples; then
    :func:`shard_batch` assembles the global array. One process: ``slice(0, B)``.
    """
    check_batch(global_batch, mesh)
    index_map = data_sharding(mesh).addressable_devices_indices_map((int(global_batch),))
    rows = sorted({(ix[0].start or 0, ix[0].stop if ix[0].stop is not None else int(global_batch))
                   for ix in index_map.values()})
    start, stop = rows[0][0], rows[-1][1]
    if sum(b - a for a, b in rows) != stop - start:
        raise ValueError("process_rows: this process's devices do not hold one contiguous block of "
                         "the batch; build the mesh with make_mesh() (process-major device order)")
    return slice(start, stop)


# --------------------------------------------------------------------------- placing arrays

def _put_leaf(x, sharding):
    if isinstance(x, jax.Array) and x.sharding == sharding:
        return x
    if jax.process_count() == 1 or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        data = _put_leaf(jax.random.key_data(x), sharding)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)                    # the same value in every process
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def put(tree: PyTree, shardings) -> PyTree:
    """Place every leaf of ``tree`` with ``shardings`` (one sharding, or a pytree
    of them matching ``tree``). Host values must be equal in every process."""
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree_util.tree_map(lambda x: _put_leaf(x, shardings), tree)
    return jax.tree_util.tree_map(_put_leaf, tree, shardings)


def replicate(tree: PyTree, mesh: Mesh, *, tensor_parallel: bool = False,
              min_features: int = 128) -> PyTree:
    """Put params / optimizer state on the mesh: replicated, or split by
    :func:`param_shardings` when ``tensor_parallel``."""
    return put(tree, param_shardings(tree, mesh, tensor_parallel=tensor_parallel,
                                     min_features=min_features))


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
    """Global arrays split by rows over ``"data"`` from this process's rows.

    ``batch``: a pytree of arrays whose first axis is this process's share of
    the global batch (the whole batch when there is one process). Raises a
    ``ValueError`` when the global batch does not divide across the devices.
    """
    sharding = data_sharding(mesh)
    n_proc = len({d.process_index for d in mesh.devices.flat})
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        return batch
    local = {int(np.shape(x)[0]) for x in leaves}
    if len(local) != 1:
        raise ValueError(f"shard_batch: the arrays disagree on the batch size: {sorted(local)}")
    check_batch(local.pop() * n_proc, mesh)
    if n_proc == 1:
        return jax.tree_util.tree_map(lambda x: jax.device_put(x, sharding), batch)
    return jax.tree_util.tree_map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), batch)


def constrain_batch(batch: PyTree, mesh: Optional[Mesh]) -> PyTree:
    """Inside a jitted function: declare that ``batch`` is split by rows over
    ``"data"`` (``jax.lax.with_sharding_constraint``); unchanged when ``mesh``
    is None.

    For a training loop that keeps the (replicated) data set on the devices
    and gathers each batch inside the step: with the constraint on the
    gathered batch, the partitioner has every device gather only its own
    N/D rows -- no device ever holds the whole batch.
    """
    if mesh is None:
        return batch
    return jax.lax.with_sharding_constraint(batch, data_sharding(mesh))


def to_host(tree: PyTree) -> PyTree:
    """NumPy copies of every leaf, also of global arrays spanning several processes
    (replicated ones are read locally; split ones are gathered)."""
    def one(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if x.is_fully_addressable:
            return np.asarray(x)
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))

    return jax.tree_util.tree_map(one, tree)


# --------------------------------------------------------------------------- the sharded step

def shard_step(step: Callable, mesh: Mesh, *, batch_argnums: Sequence[int] = (2, 3),
               donate_argnums: Sequence[int] = (), tensor_parallel: bool = False,
               min_features: int = 128) -> Callable:
    """``jax.jit(step)`` with every input and output placed on ``mesh``.

    Positional arguments in ``batch_argnums`` (default: x and y of
    ``step(params, opt_state, x, y, ...)``) are split by rows over
    ``"data"``; every other argument and every output is replicated, or split
    by :func:`param_shardings` when ``tensor_parallel``. The shardings are
    derived from the arguments' shapes on the first call for each new
    structure and cached. The returned function has ``.lower(*args)`` for
    inspecting the compiled HLO.
    """
    batch_argnums = tuple(batch_argnums)
    cache = {}

    def rule(tree):
        return param_shardings(tree, mesh, tensor_parallel=tensor_parallel, min_features=min_features)

    def compiled_for(args):
        sig = jax.tree_util.tree_structure(args), tuple(
            (np.shape(a), str(getattr(a, "dtype", type(a)))) for a in jax.tree_util.tree_leaves(args))
        if sig not in cache:
            in_sh = tuple(data_sharding(mesh) if i in batch_argnums else rule(a)
                          for i, a in enumerate(args))
            out_sh = rule(jax.eval_shape(step, *args))
            cache[sig] = jax.jit(step, in_shardings=in_sh, out_shardings=out_sh,
                                 donate_argnums=tuple(donate_argnums))
        return cache[sig]

    def sharded(*args):
        return compiled_for(args)(*args)

    sharded.lower = lambda *args: compiled_for(args).lower(*args)
    sharded.mesh = mesh
    return sharded


def data_parallel_step(grad_fn: Callable, tx: optax.GradientTransformation, mesh: Mesh, *,
                       net=None, stateful: Optional[bool] = None, stochastic: Optional[bool] = None,
                       donate: bool = False, tensor_parallel: bool = False,
                       min_features: int = 128, method: str = "partitioner") -> Callable:
    """The optax training step of ``grad_fn`` compiled for ``mesh``.

    ``grad_fn`` has the call shape of ``jax.value_and_grad(cost)``:
    ``jp.value_and_grad(net, loss)`` (hand-written) or any other. Returns
    ``step(params, opt_state, x, y, key=None, state=None)`` ->
    ``(params, opt_state, value)`` (``(value, state)`` for a net with state),
    the convention of :func:`jaxprop.train.make_train_step`; x and y are split
    over ``"data"``, the rest replicated (or split by :func:`param_shardings`).

    Args:
      grad_fn, tx: the gradient function and the optax optimizer.
      mesh: from :func:`make_mesh`.
      net: when given, ``stateful`` / ``stochastic`` default to the net's.
      donate: donate params, optimizer state (and model state) buffers.
      tensor_parallel, min_features: see :func:`param_shardings`.
      method: ``"partitioner"`` (default): ``jax.jit`` with in/out shardings,
        the cost keeps its global-batch meaning and XLA derives the gradient
        all-reduce. ``"psum"``: ``jax.shard_map`` over ``"data"``; each
        device runs ``grad_fn`` on its N/D rows (a mean over N/D) and the
        step averages explicitly, ``grads = pmean(grads, "data")`` -- equal
        to the global mean because every jaxprop loss is a batch mean and
        every device has N/D rows. Only for nets without state or randomness
        (per-device batch statistics or dropout masks would differ from the
        single-device step) and without tensor parallelism.
    """
    stateful, stochastic = step_kind(net, stateful, stochastic)
    if method not in ("partitioner", "psum"):
        raise ValueError(f"data_parallel_step: method must be 'partitioner' or 'psum', got {method!r}")
    if method == "psum" and (stateful or stochastic or tensor_parallel):
        raise ValueError("data_parallel_step: method='psum' supports only nets without state (batch "
                         "norm) or randomness (dropout) and no tensor parallelism; use the default "
                         "method='partitioner', which keeps the global-batch semantics")

    if method == "psum":                    # local means over N/D rows -> the global mean
        local_grad_fn = grad_fn

        def grad_fn(*args, **kwargs):
            return jax.lax.pmean(local_grad_fn(*args, **kwargs), DATA)

    train_step = make_train_step(grad_fn, tx, stateful=stateful, stochastic=stochastic, jit=False)

    def step(params, opt_state, x, y, key, state):  # positional: jit with shardings takes no kwargs
        return train_step(params, opt_state, x, y, key=key, state=state)

    if method == "psum":
        body = _shard_map(step, mesh, in_specs=(P(), P(), P(DATA), P(DATA), P(), P()),
                          out_specs=(P(), P(), P()))
    else:
        body = step
    donated = ((0, 1) + ((5,) if stateful else ())) if donate else ()
    inner = shard_step(body, mesh, batch_argnums=(2, 3), donate_argnums=donated,
                       tensor_parallel=tensor_parallel, min_features=min_features)

    def call(params, opt_state, x, y, key=None, state=None):
        check_step_args("data_parallel_step", stateful, stochastic, key, state)
        check_batch(np.shape(x)[0], mesh)
        return inner(params, opt_state, x, y, key, state)

    call.lower = lambda params, opt_state, x, y, key=None, state=None: inner.lower(
        params, opt_state, x, y, key, state)
    call.mesh = mesh
    return call


def _shard_map(f, mesh, in_specs, out_specs):
    """``jax.shard_map`` (``jax.experimental.shard_map`` before JAX 0.6)."""
    try:
        from jax import shard_map
    except ImportError:                     # older JAX
        from jax.experimental.shard_map import shard_map
    return shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
