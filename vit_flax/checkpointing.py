"""Flax training state (params, optax optimizer state, step, metadata) through orbax-checkpoint.

One ``directory`` holds a run's checkpoints, one sub-folder per step (``directory/<step>/``, orbax's
``CheckpointManager`` layout): :func:`save_train_state` adds one, :func:`restore_train_state` reads the
latest (or a given) one. Orbax writes each step into a temporary folder and renames it to
``<step>`` only once every array is written (``commit_success.txt`` inside), so a crash mid-save leaves
the earlier steps intact and the half-written one invisible to :func:`restore_train_state`; it is
deleted when the directory is next saved to.

This is the resume format, exact to the bit; the interchange format stays the canonical
``config.json`` + ``model.safetensors``: ``model.save_pretrained(out, params=restored["params"])``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["save_train_state", "restore_train_state", "saved_steps"]

#: The orbax items of one step: the arrays (a pytree) and the JSON metadata (``**extra``).
_ARRAYS, _EXTRA = "state", "extra"


def _ocp() -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError as err:
        raise ImportError(f"saving/restoring Flax training state needs orbax-checkpoint "
                          f"(pip install 'trivit[export]'): {err}") from None
    return ocp


def _manager(directory: str | os.PathLike[str], max_to_keep: int | None = None, create: bool = False) -> Any:
    ocp = _ocp()
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create, cleanup_tmp_directories=create,
                                           enable_async_checkpointing=False)
    return ocp.CheckpointManager(Path(directory).absolute(), options=options)


def saved_steps(directory: str | os.PathLike[str]) -> list[int]:
    """The steps saved (and completely written) in ``directory``, ascending; ``[]`` if there is none."""
    if not Path(directory).is_dir():
        return []
    manager = _manager(directory)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def save_train_state(directory: str | os.PathLike[str], *, params: Any, opt_state: Any, step: int,
                     max_to_keep: int | None = None, **extra: Any) -> Path:
    """Save ``params`` and ``opt_state`` (pytrees of arrays: a Flax param dict, an optax state) as step
    ``step`` of ``directory``; returns the step's folder ``directory/<step>``.

    ``extra``: JSON-serialisable metadata (``epoch=3``, ``history=[...]``), returned by
    :func:`restore_train_state` beside the arrays. ``max_to_keep``: delete all but the newest that many
    steps once this one is in place (default: keep all).
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if max_to_keep is not None and (isinstance(max_to_keep, bool) or not isinstance(max_to_keep, int)
                                    or max_to_keep < 1):
        raise ValueError(f"max_to_keep must be a positive int or None, got {max_to_keep!r}")
    for key, value in extra.items():
        try:
            json.dumps(value)
        except (TypeError, ValueError) as err:
            raise TypeError(f"extra metadata {key}={value!r} is not JSON-serialisable ({err}); "
                            "arrays belong in params/opt_state") from None
    ocp = _ocp()
    manager = _manager(directory, max_to_keep, create=True)
    try:
        latest = manager.latest_step()
        if latest is not None and step <= latest:
            raise ValueError(f"step {step} is already saved in {str(directory)!r}; save under a new step"
                             if step in manager.all_steps() else
                             f"step {step} is older than the latest step {latest} saved in {str(directory)!r}; "
                             "steps must increase")
        arrays = {"params": params, "opt_state": opt_state}
        saved = manager.save(step, force=True, args=ocp.args.Composite(
            **{_ARRAYS: ocp.args.StandardSave(arrays), _EXTRA: ocp.args.JsonSave(dict(extra))}))
        manager.wait_until_finished()
        if not saved:  # orbax declined (its save policy); never return as if it had saved
            raise RuntimeError(f"orbax did not save step {step} in {str(directory)!r}")
    finally:
        manager.close()
    return Path(directory) / str(step)


def restore_train_state(directory: str | os.PathLike[str], *, step: int | None = None, params_template: Any = None,
                        opt_state_template: Any = None) -> dict[str, Any]:
    """Read step ``step`` (default: the latest) of ``directory`` → ``{"params", "opt_state", "step", **extra}``.

    Arrays come back bit for bit, with the dtypes and shapes they were saved with. Without templates
    the trees are orbax's plain form (dicts and lists: an optax state's named tuples become dicts);
    with ``params_template`` / ``opt_state_template`` (arrays or ``jax.ShapeDtypeStruct``s: ``model.params``,
    ``jax.eval_shape(tx.init, params)``) they take the template's structure and types, each leaf checked
    against the template's shape and dtype (a mismatch is a ``ValueError`` naming the leaf; it is never cast).
    A leaf goes to its template leaf's sharding when that is a committed ``jax.Array`` (a replicated mesh
    state), else to the default device uncommitted, like a fresh ``jnp.asarray``.
    """
    ocp = _ocp()
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"no training-state directory {str(directory)!r}")
    manager = _manager(directory)
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"{str(directory)!r} holds no saved training state (no complete step folder)")
        if step is None:
            step = steps[-1]
        elif step not in steps:
            raise ValueError(f"step {step!r} is not saved in {str(directory)!r}; saved steps: {steps}")
        restored = manager.restore(step, args=ocp.args.Composite(**{_ARRAYS: ocp.args.StandardRestore(),
                                                                     _EXTRA: ocp.args.JsonRestore()}))
    finally:
        manager.close()
    arrays, extra = restored[_ARRAYS], restored[_EXTRA] or {}
    return {"params": _into_template(arrays["params"], params_template, "params"),
            "opt_state": _into_template(arrays["opt_state"], opt_state_template, "opt_state"),
            "step": int(step), **extra}


def _path_key(path: tuple[Any, ...]) -> tuple[str, ...]:
    """A leaf's path with dict keys, named-tuple fields and sequence indices alike (orbax saves named
    tuples as dicts of their fields and tuples as lists)."""
    return tuple(str(next(getattr(k, a) for a in ("key", "name", "idx") if hasattr(k, a))) for k in path)


def _signature(x: Any) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of an array, a ``jax.ShapeDtypeStruct`` or a Python scalar."""
    return tuple(np.shape(x)), np.dtype(x.dtype if hasattr(x, "dtype") else np.asarray(x).dtype)


def _into_template(tree: Any, template: Any, what: str) -> Any:
    """The restored ``tree``'s leaves in ``template``'s structure, matched by path; shapes and dtypes must agree."""
    if template is None:
        return jax.tree_util.tree_map(_place, tree)
    saved = {_path_key(p): leaf for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
    wanted, treedef = jax.tree_util.tree_flatten_with_path(template)
    keys = [_path_key(p) for p, _ in wanted]
    missing, unexpected = sorted(set(keys) - set(saved)), sorted(set(saved) - set(keys))
    if missing or unexpected:
        raise ValueError(f"{what}_template does not match the saved {what}: only in the template "
                         f"{['/'.join(k) for k in missing[:5]]}{' ...' if len(missing) > 5 else ''}, only saved "
                         f"{['/'.join(k) for k in unexpected[:5]]}{' ...' if len(unexpected) > 5 else ''}")
    leaves = []
    for key, (_, want) in zip(keys, wanted):
        have = saved[key]
        (hs, hd), (ws, wd) = _signature(have), _signature(want)
        if (hs, hd) != (ws, wd):
            raise ValueError(f"{what}/{'/'.join(key)}: saved shape {hs} dtype {hd}, template shape {ws} dtype {wd}")
        leaves.append(_place(have, want))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _place(array: Any, like: Any = None) -> Any:
    """``array`` on ``like``'s sharding if ``like`` is a committed ``jax.Array``; else an uncommitted array on the
    default device, as ``jnp.asarray`` makes. Why: orbax returns arrays committed to a device, which a jitted
    train step treats as a new argument placement and compiles a second time (measured: ~6 s for the tiny test
    model); the host round trip keeps every bit."""
    if isinstance(like, jax.Array) and like.committed:
        return jax.device_put(array, like.sharding)
    return jnp.asarray(np.asarray(array)) if isinstance(array, jax.Array) else array
