"""Distributed training on each framework's own engine: PyTorch DDP under ``torchrun``, JAX ``Mesh`` /
``NamedSharding`` + ``jit`` (data parallel, optionally with sharded parameters), TF ``MirroredStrategy``.

Nothing here re-implements collective communication: each engine does its own all-reduce. Every
recipe makes ONE step over a global batch of B examples give the single-process step on those B
examples (tested to 1e-5 on CPU: 2 gloo ranks, 8 simulated JAX devices, 2 logical TF devices; see
docs/distributed.md). Frameworks are imported on use, so importing this module is light.

API (what ``trivit train --distributed`` calls)::

    # ---- PyTorch: launch with `torchrun --nproc_per_node N script.py` (one process per device)
    ctx = init_torch_distributed()                   # process group from torchrun's env (gloo on CPU, nccl on GPU)
    ddp = wrap_ddp(model, ctx)                       # model moved to ctx.device, wrapped in DDP
    opt = torch.optim.AdamW(ddp.parameters(), 3e-4)
    for batch in loader:                             # the GLOBAL batch (identical on every rank), or ...
        loss = torch_train_step(ddp, opt, rank_shard(batch, ctx.rank, ctx.world_size))  # ... only this rank's part
    close_torch_distributed()

    # ---- JAX (one process per host; on several hosts call init_jax_distributed() first)
    mesh = jax_mesh(model=1)                         # axes ("data", "model"); model > 1 shards parameters
    step, params, opt_state = jax_train_setup(model, tx, mesh)   # replicated, or sharded over "model"
    for batch in loader:                             # this process's part of the global batch
        params, opt_state, loss = step(params, opt_state, shard_batch(batch, mesh))

    # ---- TF / Keras 3
    strategy = tf_strategy()                         # MirroredStrategy over all local GPUs (or given devices)
    model = tf_build_and_compile(strategy, lambda: TFViTForImageClassification(config),
                                 lambda: keras.optimizers.AdamW(3e-4))
    model.fit(tf_distributed_dataset(strategy, pixel_values, labels, global_batch=64), epochs=3)

``rank_shard`` is also what a JAX process on a multi-host run feeds to ``shard_batch``
(``rank_shard(batch, jax.process_index(), jax.process_count())``).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from trivit.quiet import quiet_frameworks

__all__ = [
    "TorchContext",
    "close_torch_distributed",
    "init_jax_distributed",
    "init_torch_distributed",
    "jax_mesh",
    "jax_param_shardings",
    "jax_train_setup",
    "make_sharded_train_step",
    "rank_shard",
    "tf_build_and_compile",
    "tf_distributed_dataset",
    "tf_keras_loss",
    "tf_strategy",
    "torch_train_step",
    "wrap_ddp",
]

#: torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``).
_TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def rank_shard(batch: Mapping[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """This rank's contiguous slice of a global batch: ``{k: v[rank * b:(rank + 1) * b]}``, ``b = B // world_size``.

    Every value is indexed along its leading (batch) axis, e.g. ``pixel_values`` (B, C, H, W) →
    (B / world_size, C, H, W). B must be the same for every key and a multiple of ``world_size``
    (unequal shards would weight examples unequally in the averaged gradient).
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    sizes = {k: len(v) for k, v in batch.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"batch entries differ in their leading (batch) size: {sizes}")
    total = next(iter(sizes.values()))
    if total % world_size:
        raise ValueError(f"global batch size {total} is not a multiple of world_size={world_size}; "
                         f"pick a batch size divisible by the number of processes/devices")
    b = total // world_size
    return {k: v[rank * b:(rank + 1) * b] for k, v in batch.items()}


# ============================================================================ PyTorch: DDP under torchrun
@dataclass(frozen=True)
class TorchContext:
    """Where this process sits in a ``torchrun`` job."""

    rank: int  #: global rank, 0 .. world_size - 1
    world_size: int  #: number of processes (= devices)
    local_rank: int  #: rank on this host: the GPU index with nccl
    device: Any  #: ``torch.device`` this rank computes on
    backend: str  #: "gloo" (CPU) or "nccl" (CUDA)


def init_torch_distributed(backend: str | None = None, timeout_s: float = 600.0) -> TorchContext:
    """Join the process group ``torchrun`` set up (its ``RANK`` / ``WORLD_SIZE`` / ``MASTER_*`` env vars).

    ``backend``: ``"nccl"`` (default when CUDA is available; each rank then uses GPU ``LOCAL_RANK``)
    or ``"gloo"`` (default on CPU). Raises ``RuntimeError`` naming the missing variables when the
    script was not started by ``torchrun``. Idempotent: a second call returns the same context.
    """
    import datetime

    import torch
    import torch.distributed as dist

    missing = [k for k in _TORCHRUN_ENV if k not in os.environ]
    if missing:
        raise RuntimeError(f"init_torch_distributed: environment variables {missing} are not set; start the script "
                           f"with `torchrun --nproc_per_node N script.py` (or set them as torchrun does)")
    cuda = torch.cuda.is_available()
    backend = backend or ("nccl" if cuda else "gloo")
    if backend not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {backend!r}")
    if backend == "nccl" and not cuda:
        raise RuntimeError("backend='nccl' needs CUDA, but torch sees no GPU; use backend='gloo' on CPU")
    local_rank = int(os.environ["LOCAL_RANK"])
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend, init_method="env://", timeout=datetime.timedelta(seconds=timeout_s))
    return TorchContext(dist.get_rank(), dist.get_world_size(), local_rank, device, backend)


def wrap_ddp(model: Any, ctx: TorchContext, **ddp_kwargs: Any) -> Any:
    """``DistributedDataParallel(model.to(ctx.device))``: gradients are averaged over ranks during
    ``backward()``. Rank 0's weights are broadcast at construction, so every rank starts equal.
    ``ddp_kwargs`` go to DDP (e.g. ``find_unused_parameters=True`` for heads a loss does not use)."""
    from torch.nn.parallel import DistributedDataParallel

    model = model.to(ctx.device)
    ids = [ctx.local_rank] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None, **ddp_kwargs)


def torch_train_step(ddp_model: Any, optimizer: Any, shard: Mapping[str, Any]) -> float:
    """One optimizer step on this rank's ``shard`` (``pixel_values`` (b, C, H, W), ``labels`` (b,), ... as
    numpy or tensors); returns the loss averaged over ranks, i.e. the global batch's mean loss when
    every rank holds b examples. The model's ``.loss`` is a mean over the shard; DDP averages the
    gradients, so the step equals one on the global batch."""
    import torch
    import torch.distributed as dist

    device = next(ddp_model.parameters()).device
    inputs = {k: (v if isinstance(v, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(v))).to(device)
              for k, v in shard.items()}
    ddp_model.train()
    optimizer.zero_grad(set_to_none=True)
    loss = ddp_model(**inputs).loss
    if loss is None:
        raise ValueError("torch_train_step: the model returned no loss; put 'labels' in the batch")
    loss.backward()
    optimizer.step()
    total = loss.detach().clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return float(total) / dist.get_world_size()


def close_torch_distributed() -> None:
    """Leave the process group (call once at the end of a ``torchrun`` script)."""
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


# ============================================================================ JAX: Mesh + NamedSharding + jit
def init_jax_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                         process_id: int | None = None) -> None:
    """Multi-host JAX: ``jax.distributed.initialize`` (call first, on every host, before any other JAX call).

    On Cloud TPU pod slices and SLURM all arguments can be left out (JAX reads them from the
    environment); elsewhere pass ``coordinator_address="host0:1234"``, ``num_processes`` and this
    host's ``process_id``. Afterwards ``jax.devices()`` lists every host's devices.
    """
    quiet_frameworks()
    import jax

    jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                               process_id=process_id)


def jax_mesh(data: int | None = None, model: int = 1, devices: Any = None) -> Any:
    """A ``jax.sharding.Mesh`` of shape (data, model) with axes ``("data", "model")``.

    ``devices`` defaults to ``jax.devices()`` (every host's); ``data`` defaults to
    ``len(devices) // model``. The batch is split over "data"; ``model > 1`` splits parameters and
    optimizer state over "model" (see :func:`jax_param_shardings`), ``model == 1`` is pure data parallel.
    """
    quiet_frameworks()
    import jax
    from jax.sharding import Mesh

    devices = list(jax.devices() if devices is None else devices)
    if model < 1 or len(devices) % model:
        raise ValueError(f"model={model} must be >= 1 and divide the {len(devices)} devices")
    data = len(devices) // model if data is None else data
    if data * model != len(devices):
        raise ValueError(f"data={data} x model={model} != {len(devices)} devices")
    return Mesh(np.array(devices).reshape(data, model), ("data", "model"))


def jax_param_shardings(tree: Any, mesh: Any, axis: str = "model", min_size: int = 1024) -> Any:
    """A ``NamedSharding`` per leaf of ``tree`` (params or optimizer state): FSDP / ZeRO-3 style sharding.

    A leaf with at least ``min_size`` elements is split along its largest dimension that
    ``mesh.shape[axis]`` divides (each device holds 1/n of it; XLA all-gathers it where the step
    needs it whole); every other leaf (biases, norms, scalars such as Adam's step count) is
    replicated. Optimizer moments have their parameter's shape, so they get the same split.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    if axis not in mesh.shape:
        raise ValueError(f"axis {axis!r} is not a mesh axis {tuple(mesh.shape)}")
    n = mesh.shape[axis]

    def spec(leaf: Any) -> Any:
        shape = tuple(np.shape(leaf))
        if n > 1 and int(np.prod(shape, dtype=np.int64)) >= min_size:
            dims = sorted((d for d in range(len(shape)) if shape[d] % n == 0), key=lambda d: -shape[d])
            if dims:
                return NamedSharding(mesh, PartitionSpec(*[axis if d == dims[0] else None for d in range(len(shape))]))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree_util.tree_map(spec, tree)


def make_sharded_train_step(model: Any, tx: Any, mesh: Any, param_shardings: Any, opt_shardings: Any) -> Any:
    """``vit_flax.training.make_train_step``'s step, jitted with sharded params and optimizer state.

    ``step(params, opt_state, batch) -> (params, opt_state, loss)``: params / opt_state keep the
    given shardings (from :func:`jax_param_shardings`) in and out, the batch (from
    ``vit_flax.training.shard_batch``) is split over the mesh's first axis, loss is replicated. The
    numbers are those of the single-device step; only the memory layout differs.
    """
    import jax
    from jax.sharding import NamedSharding, PartitionSpec

    from vit_flax.training import make_train_step

    batch_sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
    return jax.jit(make_train_step(model, tx), in_shardings=(param_shardings, opt_shardings, batch_sharding),
                   out_shardings=(param_shardings, opt_shardings, NamedSharding(mesh, PartitionSpec())))


def jax_train_setup(model: Any, tx: Any, mesh: Any, params: Any = None, min_size: int = 1024) -> tuple[Any, Any, Any]:
    """``(step, params, opt_state)`` placed on ``mesh``, ready for ``step(params, opt_state, shard_batch(batch, mesh))``.

    ``params`` defaults to ``model.params``. With a "model" mesh axis of size 1 this is
    ``vit_flax.training``'s data-parallel step (replicated state); larger, params and optimizer
    state are sharded over it (:func:`jax_param_shardings`, :func:`make_sharded_train_step`). Every
    process must pass the same ``params``.
    """
    import jax

    from vit_flax.training import make_train_step, replicate

    params = model.params if params is None else params
    if mesh.shape.get("model", 1) == 1:
        return make_train_step(model, tx, mesh), replicate(params, mesh), replicate(tx.init(params), mesh)
    p_shard = jax_param_shardings(params, mesh, min_size=min_size)
    opt_state = tx.init(params)
    o_shard = jax_param_shardings(opt_state, mesh, min_size=min_size)
    step = make_sharded_train_step(model, tx, mesh, p_shard, o_shard)
    # device_put with a per-leaf sharding tree; each process passes identical full values
    return step, jax.device_put(params, p_shard), jax.device_put(opt_state, o_shard)


# ============================================================================ TF / Keras 3: MirroredStrategy
def tf_strategy(devices: list[str] | None = None) -> Any:
    """``tf.distribute.MirroredStrategy``: one replica per device of this host, gradients all-reduced
    (summed) each step. ``devices`` defaults to every local GPU (the CPU when there is none), e.g.
    ``["/gpu:0", "/gpu:1"]``. For several hosts use ``tf.distribute.MultiWorkerMirroredStrategy``
    (see docs/distributed.md)."""
    quiet_frameworks()
    import tensorflow as tf

    return tf.distribute.MirroredStrategy(devices)


def tf_keras_loss(config: Any) -> Any:
    """The Keras loss matching the model's own (``config.problem_type``, as HF / ``vit_torch``):
    single-label → sparse categorical cross-entropy on logits, regression (also ``num_labels == 1``
    without a problem type) → MSE, multi-label → binary cross-entropy on logits. Keras losses are
    scaled by 1 / replicas under a strategy, so the summed gradient is the global batch mean."""
    import keras

    kind = getattr(config, "problem_type", None) or ("regression" if config.num_labels == 1 else "single_label_classification")
    losses = {"single_label_classification": lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True),
              "regression": keras.losses.MeanSquaredError,
              "multi_label_classification": lambda: keras.losses.BinaryCrossentropy(from_logits=True)}
    if kind not in losses:
        raise ValueError(f"config.problem_type must be one of {sorted(losses)}, got {kind!r}")
    return losses[kind]()


def tf_build_and_compile(strategy: Any, build_model: Callable[[], Any], make_optimizer: Callable[[], Any],
                         jit_compile: bool = False, **compile_kwargs: Any) -> Any:
    """Build the model and its optimizer inside ``strategy.scope()`` (so their variables are mirrored)
    and compile it with :func:`tf_keras_loss`.

    A compiled Keras loss is the standard Keras recipe; the model's own loss (``compile()`` without a
    loss, labels in x) gives the same step, since ``vit_tf`` scales it by 1 / replicas as Keras does.
    ``compile_kwargs`` (``metrics``, ``loss`` to override ...) go to ``model.compile``. Feed ``fit``
    ``(pixel_values, labels)`` pairs, e.g. from :func:`tf_distributed_dataset`.
    """
    with strategy.scope():
        model = build_model()
        compile_kwargs.setdefault("loss", tf_keras_loss(model.config))
        model.compile(optimizer=make_optimizer(), jit_compile=jit_compile, **compile_kwargs)
    return model


def tf_distributed_dataset(strategy: Any, pixel_values: Any, labels: Any, global_batch: int,
                           shuffle: int | None = None, seed: int = 0) -> Any:
    """``strategy.experimental_distribute_dataset`` of ``(pixel_values, labels)`` batches of ``global_batch``.

    ``pixel_values`` (N, C, H, W) float32, ``labels`` (N,) (or (N, num_labels)); each step every
    replica gets ``global_batch / replicas`` examples. ``shuffle``: a buffer size (None: keep order).
    The last incomplete batch is dropped so that every step splits evenly.
    """
    import tensorflow as tf

    n = strategy.num_replicas_in_sync
    if global_batch % n:
        raise ValueError(f"global_batch={global_batch} is not a multiple of the {n} replicas")
    ds = tf.data.Dataset.from_tensor_slices((pixel_values, labels))
    if shuffle:
        ds = ds.shuffle(shuffle, seed=seed)
    ds = ds.batch(global_batch, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return strategy.experimental_distribute_dataset(ds)
