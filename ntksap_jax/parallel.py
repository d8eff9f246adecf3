"""Many devices and many hosts through JAX's own SPMD machinery: a device ``Mesh``, ``NamedSharding``s,
``jax.distributed``.

The library is written for one device; a mesh makes the *same* jitted programs run across many.
Arrays are placed with shardings and the compiler (GSPMD) partitions the work and inserts the
collectives, so every reduction over the batch (the loss, the gradients, BatchNorm's batch
statistics) is taken over the *global* batch, exactly as on one device:

* :func:`make_mesh` builds a ``("data", "model")`` mesh over the devices (``model`` of size 1
  unless asked: pure data parallelism);
* batches are split along their leading axis over ``"data"`` (:func:`shard_batch` for host
  batches, :func:`shard_examples` inside a jitted function, e.g. NTK-SAP's Gaussian inputs);
* params, masks, BatchNorm statistics and optimiser state are replicated, or, with a ``model``
  axis of size > 1, each kernel's output-feature axis is split over it (:func:`param_shardings`);
* :func:`initialize_distributed` starts a multi-host run (TPU pod slices, SLURM, Open MPI and
  Kubernetes are detected by JAX; elsewhere pass a coordinator address).

``prune(..., mesh=mesh)`` and ``train(..., mesh=mesh)`` use these; so does the command line's
``--devices N``. Scores, masks and training steps match the one-device results to float32
rounding (reductions are summed in another order), and the masks are identical on every device.

Example::

    from ntksap_jax import ntksap_scorer, prune
    from ntksap_jax.parallel import make_mesh
    mesh = make_mesh()                       # all devices, data parallel
    result = prune(ntksap_scorer(model, (32, 32, 3)), params, batch_stats=batch_stats,
                   density=0.05, iterations=20, key=jax.random.key(0), mesh=mesh)

Trap: a batch placed with :func:`shard_batch` must divide evenly over the ``data`` axis (a clear
``ValueError`` says so). Inside jitted code (:func:`shard_examples`) an uneven split is allowed:
XLA pads the last shard and masks the padding out of every reduction, so 100 Gaussian inputs on
8 devices still give the one-device result.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from ntksap_jax._checks import is_none as _is_none

__all__ = [
    "DATA_AXIS",
    "MODEL_AXIS",
    "make_mesh",
    "initialize_distributed",
    "data_parallel_size",
    "replicated",
    "batch_sharding",
    "param_shardings",
    "place",
    "shard_batch",
    "shard_examples",
    "mesh_context",
    "is_primary_process",
    "cpu_collectives_need_serial",
    "sync_processes",
    "mesh_summary",
]

PyTree = Any

#: Mesh axis over which batches are split.
DATA_AXIS = "data"
#: Mesh axis over which kernels' output features are split (size 1 unless asked for).
MODEL_AXIS = "model"


def make_mesh(
    num_devices: int | None = None,
    *,
    model_parallel: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A ``(data, model)`` device mesh: ``num_devices / model_parallel`` × ``model_parallel``.

    Both axes are ``AxisType.Auto`` (the compiler decides the layout of intermediates), so the
    library's jitted functions run on it unchanged.

    Args:
      num_devices: how many devices to use, the first ones of ``devices``; default all of them.
        Across hosts (after :func:`initialize_distributed`) ``jax.devices()`` lists every
        process's devices, and the mesh spans them all.
      model_parallel: size of the ``model`` axis (1: pure data parallelism); must divide
        ``num_devices``.
      devices: the devices to choose from; default ``jax.devices()``.

    Returns:
      A ``jax.sharding.Mesh`` with axis names ``("data", "model")``.

    Raises:
      ValueError: ``num_devices`` is not in ``1..len(devices)`` or ``model_parallel`` does not divide it.

    Example::

      mesh = make_mesh()                    # e.g. Mesh('data': 8, 'model': 1) on a v5e-8
      mesh = make_mesh(8, model_parallel=2)  # Mesh('data': 4, 'model': 2)
    """
    devices = list(jax.devices() if devices is None else devices)
    available = len(devices)
    n = available if num_devices is None else num_devices
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= available:
        raise ValueError(
            f"num_devices must be an integer in 1..{available} (the devices available); got {num_devices!r}"
        )
    if isinstance(model_parallel, bool) or not isinstance(model_parallel, (int, np.integer)) or model_parallel < 1:
        raise ValueError(f"model_parallel must be a positive integer; got {model_parallel!r}")
    if n % model_parallel:
        raise ValueError(f"model_parallel={model_parallel} must divide the number of devices ({n})")
    grid = np.asarray(devices[: int(n)], dtype=object).reshape(int(n) // int(model_parallel), int(model_parallel))
    return Mesh(grid, (DATA_AXIS, MODEL_AXIS), axis_types=(AxisType.Auto, AxisType.Auto))


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: Sequence[int] | None = None,
) -> bool:
    """Start a multi-host run with ``jax.distributed.initialize`` (once; later calls do nothing).

    Call it first thing in every process, before any other JAX call. With no arguments JAX
    detects the cluster itself on Cloud TPU pod slices, SLURM, Open MPI (``mpirun``) and
    Kubernetes/GKE, and reads ``JAX_COORDINATOR_ADDRESS`` from the environment; elsewhere
    (e.g. plain SSH on several GPU hosts) pass all three of ``coordinator_address``
    (``"host0:1234"``), ``num_processes`` and ``process_id``.

    Returns:
      True if this call initialised the distributed runtime, False if it was already running.

    Example::

      initialize_distributed()                                    # TPU pod slice / SLURM
      initialize_distributed("10.0.0.1:1234", num_processes=2, process_id=int(os.environ["RANK"]))
      mesh = make_mesh()                                          # spans every host's devices
    """
    if jax.distributed.is_initialized():
        return False
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
    return True


def data_parallel_size(mesh: Mesh | None) -> int:
    """Number of devices along the ``data`` axis (1 without a mesh).

    Example::

      data_parallel_size(make_mesh(8, model_parallel=2))   # 4
    """
    return 1 if mesh is None else int(mesh.shape[DATA_AXIS])


def replicated(mesh: Mesh) -> NamedSharding:
    """The sharding that keeps a full copy on every device of ``mesh``.

    Example::

      params = jax.device_put(params, replicated(mesh))
    """
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Split an array's leading (batch) axis over the ``data`` axis; other axes whole.

    Example::

      x = jax.device_put(x, batch_sharding(mesh))   # x.shape[0] divisible by the data axis
    """
    return NamedSharding(mesh, P(DATA_AXIS))


def param_shardings(tree: PyTree, mesh: Mesh) -> PyTree:
    """A sharding per leaf of ``tree`` (params, masks, optimiser state, batch statistics).

    With a ``model`` axis of size 1 every leaf is replicated. Otherwise a leaf with ``ndim ≥ 2``
    (a dense or conv kernel, or its mask or momentum) whose last axis (output features, in
    Flax's ``HWIO``/``(in, out)`` layout) divides by the ``model`` axis is split along that
    axis; everything else (biases, BatchNorm, small heads) is replicated. ``None`` leaves
    (dense entries of a mask pytree) stay ``None``.

    Example::

      shardings = param_shardings(params, make_mesh(8, model_parallel=2))
      params = place(params, shardings)
    """
    k = int(mesh.shape[MODEL_AXIS])
    whole = replicated(mesh)

    def one(leaf):
        if leaf is None:
            return None
        shape = np.shape(leaf)
        if k > 1 and len(shape) >= 2 and shape[-1] % k == 0:
            return NamedSharding(mesh, P(*([None] * (len(shape) - 1)), MODEL_AXIS))
        return whole

    return jax.tree.map(one, tree, is_leaf=_is_none)


def _put(x, sharding: NamedSharding):
    if isinstance(x, jax.Array):
        if x.sharding == sharding:
            return x
        if not x.is_fully_addressable:  # a global array of another layout: let the compiler move it
            return jax.jit(lambda a: a, out_shardings=sharding)(x)
    x = np.asarray(x)
    # Every process holds the full value; each fills in its own devices' slices (works across hosts).
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def place(tree: PyTree, shardings: PyTree | NamedSharding) -> PyTree:
    """Put every array leaf of ``tree`` on devices with the given sharding(s).

    ``shardings`` is one sharding for all leaves or a pytree of them (e.g. from
    :func:`param_shardings`). Host values must be the same in every process (each process fills
    only its own devices); arrays already laid out as asked are returned as they are.

    Example::

      params = place(params, replicated(mesh))
    """
    if isinstance(shardings, NamedSharding):
        return jax.tree.map(lambda x: _put(x, shardings), tree)
    return jax.tree.map(lambda s, x: x if s is None else _put(x, s), shardings, tree, is_leaf=_is_none)


def shard_batch(batch: PyTree, mesh: Mesh) -> PyTree:
    """Place a host batch (a dict of arrays with a common leading axis) split over ``data``.

    Every process passes the same *global* batch (this library's data pipelines are pure
    functions of ``(seed, epoch)``, so each host builds it identically) and keeps only its own
    devices' rows.

    Raises:
      ValueError: the batch size does not divide evenly over the ``data`` axis.

    Example::

      batch = shard_batch({"image": x, "label": y, "mask": m}, mesh)   # x.shape[0] % 8 == 0
    """
    n = data_parallel_size(mesh)
    sizes = {int(np.shape(x)[0]) for x in jax.tree.leaves(batch)}
    for size in sizes:
        if size % n:
            raise ValueError(
                f"a batch of {size} examples does not split evenly over the {n} devices of the mesh's "
                f"'{DATA_AXIS}' axis; use a batch size divisible by {n}"
            )
    return place(batch, batch_sharding(mesh))


def mesh_context(mesh: Mesh | None):
    """``jax.set_mesh(mesh)``, or a context that does nothing for ``mesh=None`` (one device).

    Example::

      with mesh_context(mesh):
          scores = score_fn(params, masks, batch_stats, key)
    """
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def shard_examples(x: jax.Array) -> jax.Array:
    """Inside jitted code: split ``x``'s leading axis over the current mesh's ``data`` axis.

    A no-op unless called under ``jax.set_mesh(mesh)`` (as :func:`ntksap_jax.prune` and
    :func:`ntksap_jax.train` do when given a mesh) with a ``data`` axis of size > 1, so the
    scorers work unchanged on one device. An uneven split is allowed here (XLA pads it and
    masks the padding out of reductions).

    Example::

      @jax.jit
      def f(key):
          x = shard_examples(jax.random.normal(key, (100, 32, 32, 3)))
          ...
      with jax.set_mesh(mesh):
          f(key)
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or DATA_AXIS not in mesh.axis_names or mesh.shape[DATA_AXIS] == 1:
        return x
    return jax.lax.with_sharding_constraint(x, P(DATA_AXIS))


def sync_processes(name: str) -> None:
    """Barrier across the processes of a multi-host run (e.g. after process 0 wrote a file the
    others read); a no-op in a single process.

    Example::

      if is_primary_process():
          save_masks(path, masks)
      sync_processes("masks written")
    """
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def cpu_collectives_need_serial(mesh: Mesh | None) -> bool:
    """True for a multi-device mesh on XLA:CPU, where the library runs one program at a time.

    XLA:CPU runs each device's share of a program as a task on a shared thread pool, and a
    task that reaches a collective (the gradient all-reduce) holds its thread until every
    device arrives. With several programs in flight (JAX's asynchronous dispatch) and more
    simulated devices than the pool can serve at once, the tasks of a later step can hold the
    threads that an earlier step's last device needs: a deadlock (seen with 8 simulated
    devices on 2 cores, about one run in two). Waiting for each step's result before
    dispatching the next removes it at no cost there. GPUs and TPUs keep asynchronous dispatch.

    Example::

      if cpu_collectives_need_serial(mesh):
          jax.block_until_ready(metrics)
    """
    if mesh is None or mesh.empty or mesh.devices.size == 1:
        return False
    return mesh.devices.flat[0].platform == "cpu"


def is_primary_process() -> bool:
    """True in the process that writes files (process 0); always True on one host.

    Example::

      if is_primary_process():
          save_masks("masks.npz", masks)
    """
    return jax.process_index() == 0


def mesh_summary(mesh: Mesh | None) -> dict:
    """A JSON-ready description of ``mesh`` (``None``: one device) for reports.

    Example::

      mesh_summary(make_mesh())   # {'devices': 8, 'data': 8, 'model': 1, 'processes': 1, 'platform': 'tpu'}
    """
    if mesh is None:
        device = jax.devices()[0]
        return {"devices": 1, "data": 1, "model": 1, "processes": 1, "platform": device.platform}
    devices = mesh.devices.ravel()
    return {
        "devices": int(math.prod(mesh.devices.shape)),
        "data": int(mesh.shape[DATA_AXIS]),
        "model": int(mesh.shape[MODEL_AXIS]),
        "processes": len({d.process_index for d in devices}),
        "platform": devices[0].platform,
    }
