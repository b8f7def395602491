"""A small data-parallel training recipe: one jitted optax step, optionally over a device mesh.

With a ``mesh``, params and optimizer state are replicated and the batch is sharded along the
mesh's first axis (``NamedSharding``); XLA inserts the gradient all-reduce, so the step gives
the single-device numbers. The same code is meant for several hosts (a TPU pod slice, after
``jax.distributed.initialize()``): :func:`shard_batch` then takes each process's own part of the
batch, and :func:`replicate` places the (identical on every host) params; that multi-host case is
not exercised by trivit's tests, which fake 8 CPU devices in one process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .modeling_flax_utils import Params

__all__ = ["make_train_step", "shard_batch", "replicate"]

Batch = dict[str, jax.Array]
TrainStep = Callable[[Params, Any, Batch], tuple[Params, Any, jax.Array]]


def make_train_step(model: Any, tx: optax.GradientTransformation, mesh: Mesh | None = None) -> TrainStep:
    """``step(params, opt_state, batch) -> (params, opt_state, loss)`` for a model whose call returns ``.loss``.

    ``batch`` holds the model's keyword inputs (``pixel_values`` (B, C, H, W), ``labels`` (B,), ...).
    """

    def step(params: Params, opt_state: Any, batch: Batch) -> tuple[Params, Any, jax.Array]:
        loss, grads = jax.value_and_grad(lambda p: model(params=p, **batch).loss)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    if mesh is None:
        return jax.jit(step)
    replicated = NamedSharding(mesh, PartitionSpec())
    sharded = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
    return jax.jit(step, in_shardings=(replicated, replicated, sharded), out_shardings=replicated)


def shard_batch(batch: Batch, mesh: Mesh) -> Batch:
    """Global arrays split along their leading axis over the mesh's first axis.

    ``batch`` is this process's part of the global batch (with one process: all of it); each
    process's part is spread over its own devices, and the global leading size is the sum.
    """
    sharding = NamedSharding(mesh, PartitionSpec(mesh.axis_names[0]))
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
    """A full copy of ``tree`` (params, optimizer state) on every device of ``mesh``; every process
    must pass the same values."""
    return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))
