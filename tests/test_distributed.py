"""trivit.distributed on each engine: ONE distributed step equals the single-process step on the same global batch.

Each engine runs in its own subprocess (its devices must be configured before it initialises), with
this file as the worker script (``python tests/test_distributed.py ENGINE CHECKPOINT OUT``):

* torch: 2 gloo ranks under ``torchrun --standalone --nproc_per_node 2``, DDP (each rank 8 of 16 examples);
* jax: 8 CPU devices (``--xla_force_host_platform_device_count=8``): data parallel on an 8x1 mesh, and
  parameters + optimizer state sharded over the "model" axis of a 4x2 mesh;
* tf: 2 logical CPU devices, ``MirroredStrategy``, ``fit`` on a distributed dataset.

The workers only write numbers (npz); the comparisons are here. The reference is each engine's plain
single-process step with the model's own loss. A third run, the plain step on half of the batch,
must differ from the reference by far more than the tolerance: an unsynchronised gradient (each
rank stepping on its own shard) or a mis-scaled one would fail. SGD at lr 0.5: the weights move by
up to ~0.5 while fp32 summation-order noise stays ~1e-8.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tolerances import DIST_ATOL, DIST_TRAIN_ATOL

ROOT = Path(__file__).resolve().parents[1]
LR = 0.5
GLOBAL_BATCH = 16
#: The half-batch step must move some weight at least this far from the full-batch step (sensitivity check).
MIN_SENSITIVITY = 1e-3


def _config():
    from vit_core import ViTConfig

    return ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
                     image_size=32, patch_size=8, num_labels=3, layer_norm_eps=1e-6)


def _batch() -> dict[str, np.ndarray]:
    """The global batch: ``pixel_values`` (16, 3, 32, 32) float32, ``labels`` (16,) int64 in [0, 3)."""
    rng = np.random.default_rng(0)
    return {"pixel_values": rng.standard_normal((GLOBAL_BATCH, 3, 32, 32)).astype(np.float32),
            "labels": rng.integers(0, 3, GLOBAL_BATCH).astype(np.int64)}


def _half(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v[: GLOBAL_BATCH // 2] for k, v in batch.items()}


# ============================================================================ workers (run in subprocesses)
def _torch_worker(folder: str, out: Path) -> None:
    import torch

    from trivit.distributed import close_torch_distributed, init_torch_distributed, rank_shard, torch_train_step, wrap_ddp
    from vit_torch import ViTForImageClassification

    torch.set_num_threads(1)
    ctx = init_torch_distributed()
    assert ctx.world_size == 2 and ctx.backend == "gloo", ctx
    batch = _batch()
    ddp = wrap_ddp(ViTForImageClassification.from_pretrained(folder), ctx)
    loss = torch_train_step(ddp, torch.optim.SGD(ddp.parameters(), lr=LR), rank_shard(batch, ctx.rank, ctx.world_size))
    result = {f"dist.{k}": v.detach().cpu().numpy() for k, v in ddp.module.state_dict().items()}
    result["loss.dist"] = np.float64(loss)
    if ctx.rank == 0:
        for tag, data in (("ref", batch), ("half", _half(batch))):
            model = ViTForImageClassification.from_pretrained(folder).train()
            opt = torch.optim.SGD(model.parameters(), lr=LR)
            step_loss = model(**{k: torch.from_numpy(v) for k, v in data.items()}).loss
            step_loss.backward()
            opt.step()
            result.update({f"{tag}.{k}": v.detach().numpy() for k, v in model.state_dict().items()})
            result[f"loss.{tag}"] = np.float64(step_loss.item())
    np.savez(out / f"rank{ctx.rank}.npz", **result)
    close_torch_distributed()


def _jax_worker(folder: str, out: Path) -> None:
    import jax
    import optax

    from trivit.distributed import jax_mesh, jax_train_setup
    from vit_flax import FlaxViTForImageClassification
    from vit_flax.training import make_train_step, shard_batch

    jax.config.update("jax_default_matmul_precision", "highest")
    assert jax.device_count() == 8, jax.devices()
    model = FlaxViTForImageClassification.from_pretrained(folder)
    tx = optax.sgd(LR)
    batch = _batch()

    def flat(tree) -> dict[str, np.ndarray]:
        return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}

    result: dict[str, np.ndarray] = {}
    for tag, data in (("ref", batch), ("half", _half(batch))):
        params, _, loss = make_train_step(model, tx)(model.params, tx.init(model.params), data)
        result.update({f"{tag}.{k}": v for k, v in flat(params).items()})
        result[f"loss.{tag}"] = np.float64(loss)
    sharded = {}
    for tag, mesh_shape in (("dp", (8, 1)), ("fsdp", (4, 2))):
        mesh = jax_mesh(*mesh_shape)
        step, params, opt_state = jax_train_setup(model, tx, mesh, min_size=64)
        sharded[tag] = sum(not leaf.sharding.is_fully_replicated for leaf in jax.tree_util.tree_leaves(params))
        gb = shard_batch(batch, mesh)
        assert len(gb["pixel_values"].sharding.device_set) == 8
        params, opt_state, loss = step(params, opt_state, gb)
        result.update({f"{tag}.{k}": v for k, v in flat(params).items()})
        result[f"loss.{tag}"] = np.float64(loss)
    np.savez(out / "jax.npz", **result)
    (out / "jax.json").write_text(json.dumps({"sharded_leaves": sharded}))


def _tf_worker(folder: str, out: Path) -> None:
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras

    from trivit.distributed import tf_build_and_compile, tf_distributed_dataset, tf_strategy
    from vit_tf import TFViTForImageClassification

    batch = _batch()
    result: dict[str, np.ndarray] = {}
    for tag, data in (("ref", batch), ("half", _half(batch))):  # plain Keras, the model's own loss, one replica
        model = TFViTForImageClassification.from_pretrained(folder)
        model.compile(optimizer=keras.optimizers.SGD(LR))
        loss = model.fit(tf.data.Dataset.from_tensor_slices(data).batch(GLOBAL_BATCH), epochs=1, verbose=0,
                         shuffle=False).history["loss"][0]
        result.update({f"{tag}.{k}": v for k, v in model.state_dict_numpy().items()})
        result[f"loss.{tag}"] = np.float64(loss)
    strategy = tf_strategy(["/cpu:0", "/cpu:1"])
    assert strategy.num_replicas_in_sync == 2
    model = tf_build_and_compile(strategy, lambda: TFViTForImageClassification.from_pretrained(folder),
                                 lambda: keras.optimizers.SGD(LR))
    ds = tf_distributed_dataset(strategy, batch["pixel_values"], batch["labels"], GLOBAL_BATCH)
    history = model.fit(ds, epochs=1, verbose=0, shuffle=False).history["loss"]
    assert len(history) == 1
    result.update({f"dist.{k}": v for k, v in model.state_dict_numpy().items()})
    result["loss.dist"] = np.float64(history[0])
    # The model's own loss (compile() without one, labels in x) under the strategy: scaled by 1 / replicas too.
    with strategy.scope():
        model = TFViTForImageClassification.from_pretrained(folder)
        model.compile(optimizer=keras.optimizers.SGD(LR))
    own = tf.data.Dataset.from_tensor_slices(dict(batch)).batch(GLOBAL_BATCH)
    history = model.fit(strategy.experimental_distribute_dataset(own), epochs=1, verbose=0, shuffle=False).history
    result.update({f"own.{k}": v for k, v in model.state_dict_numpy().items()})
    result["loss.own"] = np.float64(history["loss"][0])
    np.savez(out / "tf.npz", **result)


_WORKERS = {"torch": _torch_worker, "jax": _jax_worker, "tf": _tf_worker}


# ============================================================================ tests (the parent process)
def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "TF_CPP_MIN_LOG_LEVEL": "3", "JAX_PLATFORMS": "cpu",
            "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", **extra}


def _run(cmd: list[str], env: dict[str, str], timeout: int = 240) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, f"{' '.join(cmd[:4])} ... failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def _worker_cmd(engine: str, folder: Path, out: Path) -> list[str]:
    return [sys.executable, __file__, engine, str(folder), str(out)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny random ViT classifier (hidden 32, 2 layers, 32 px, patch 8, 3 labels), saved by vit_torch."""
    import torch

    from vit_torch import ViTForImageClassification

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dist") / "vit"
    ViTForImageClassification(_config()).save_pretrained(folder)
    return folder


def _params(npz, tag: str) -> dict[str, np.ndarray]:
    return {k.partition(".")[2]: npz[k] for k in npz.files if k.startswith(tag + ".")}


def _max_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert sorted(a) == sorted(b) and a, f"parameter names differ: {sorted(set(a) ^ set(b))[:5]}"
    return max(float(np.max(np.abs(a[k].astype(np.float64) - b[k].astype(np.float64)))) for k in a)


def _check(npz, tag: str, ref_npz=None) -> None:
    """``tag``'s step (loss and weights) is the reference step; the half-batch step is not."""
    ref_npz = npz if ref_npz is None else ref_npz
    ref = _params(ref_npz, "ref")
    assert _max_diff(_params(ref_npz, "half"), ref) > MIN_SENSITIVITY, "the check could not tell half a batch apart"
    loss_diff = abs(float(npz[f"loss.{tag}"]) - float(ref_npz["loss.ref"]))
    assert loss_diff <= DIST_ATOL, f"{tag}: loss {float(npz[f'loss.{tag}'])} vs {float(ref_npz['loss.ref'])}"
    param_diff = _max_diff(_params(npz, tag), ref)
    assert param_diff <= DIST_ATOL, f"{tag}: weights differ from the single-process step by {param_diff:.3g}"


def test_torch_ddp_two_gloo_ranks_match_single_process(checkpoint, tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
    _run([*launcher, "--standalone", "--nproc_per_node", "2", *_worker_cmd("torch", checkpoint, tmp_path)[1:]], _env())
    rank0, rank1 = np.load(tmp_path / "rank0.npz"), np.load(tmp_path / "rank1.npz")
    _check(rank0, "dist")
    _check(rank1, "dist", ref_npz=rank0)  # both ranks hold the same weights after the step


def test_jax_mesh_data_parallel_and_sharded_params_match_single_device(checkpoint, tmp_path):
    _run(_worker_cmd("jax", checkpoint, tmp_path), _env(XLA_FLAGS="--xla_force_host_platform_device_count=8"))
    npz = np.load(tmp_path / "jax.npz")
    sharded = json.loads((tmp_path / "jax.json").read_text())["sharded_leaves"]
    assert sharded["dp"] == 0 and sharded["fsdp"] > 0, sharded  # fsdp really split some parameters
    _check(npz, "dp")
    _check(npz, "fsdp")


def test_tf_mirrored_strategy_two_replicas_match_single_replica(checkpoint, tmp_path):
    _run(_worker_cmd("tf", checkpoint, tmp_path), _env())
    npz = np.load(tmp_path / "tf.npz")
    _check(npz, "dist")  # a compiled Keras loss
    _check(npz, "own")  # the model's internal loss


def test_rank_shard_splits_evenly_and_names_bad_sizes():
    from trivit.distributed import rank_shard

    batch = {"x": np.arange(12).reshape(6, 2), "y": np.arange(6)}
    parts = [rank_shard(batch, r, 3) for r in range(3)]
    np.testing.assert_array_equal(np.concatenate([p["y"] for p in parts]), batch["y"])
    with pytest.raises(ValueError, match="not a multiple of world_size=4"):
        rank_shard(batch, 0, 4)
    with pytest.raises(ValueError, match="rank must be in"):
        rank_shard(batch, 3, 3)


def test_init_torch_distributed_outside_torchrun_says_so(monkeypatch):
    from trivit.distributed import init_torch_distributed

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(RuntimeError, match="torchrun --nproc_per_node"):
        init_torch_distributed()



# ============================================================================ trivit train --distributed, end to end
#: The train verb's run: 100 digits (90 training images, a multiple of the 2 devices), batch 16 (6 steps, the last
#: one of 10), one epoch of AdamW at lr 1e-3 with augmentation (seeded by (seed, epoch): the same in both runs).
TRAIN_ARGS = ["--data", "sklearn-digits", "--limit", "100", "--epochs", "1", "--batch-size", "16", "--no-progress"]


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory) -> Path:
    """The tiny ViT of ``checkpoint`` with the digits' 10 labels (no head swap: both runs start from equal weights)."""
    import torch

    from vit_torch import ViTForImageClassification

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("dist") / "digits"
    ViTForImageClassification(_config().copy(num_labels=10, id2label={i: str(i) for i in range(10)},
                                             label2id={str(i): i for i in range(10)})).save_pretrained(folder)
    return folder


def _weights(folder: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("framework", ["torch", "flax", "tf"])
def test_trivit_train_distributed_matches_single_process(framework, digits_checkpoint, tmp_path):
    from trivit.cli import main

    args = ["train", *TRAIN_ARGS, "--model", str(digits_checkpoint), "--framework", framework]
    assert main([*args, "--out", str(tmp_path / "single")]) == 0
    cli = ["-m", "trivit.cli", *args, "--out", str(tmp_path / "dist"), "--distributed"]
    if framework == "torch":
        torchrun = Path(sys.executable).with_name("torchrun")
        launcher = [str(torchrun)] if torchrun.exists() else [sys.executable, "-m", "torch.distributed.run"]
        _run([*launcher, "--standalone", "--nproc_per_node", "2", *cli], _env())
    elif framework == "flax":
        _run([sys.executable, *cli], _env(XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    else:
        _run([sys.executable, *cli], _env(TRIVIT_TF_LOGICAL_DEVICES="2"))
    single, dist = _weights(tmp_path / "single"), _weights(tmp_path / "dist")
    assert _max_diff(single, _weights(digits_checkpoint)) > MIN_SENSITIVITY  # the epoch did move the weights
    diff = _max_diff(dist, single)
    assert diff <= DIST_TRAIN_ATOL, f"{framework}: --distributed weights are {diff:.3g} from the single-process run"
    state = json.loads((tmp_path / "dist" / "trainer_state.json").read_text())
    assert state["devices"] == 2 and state["global_step"] == 6 and state["history"][0]["train_loss"] == pytest.approx(
        json.loads((tmp_path / "single" / "trainer_state.json").read_text())["history"][0]["train_loss"], abs=1e-4)


if __name__ == "__main__":  # worker: python tests/test_distributed.py ENGINE CHECKPOINT OUT
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    engine, folder_arg, out_arg = sys.argv[1:4]
    _WORKERS[engine](folder_arg, Path(out_arg))
