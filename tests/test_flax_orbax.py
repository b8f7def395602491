"""vit_flax.checkpointing: Flax training state through orbax — exact round trip, exact resume, crash safety."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
pytest.importorskip("orbax.checkpoint")

import jax.numpy as jnp  # noqa: E402

from vit_core.config import ViTConfig  # noqa: E402
from vit_flax import FlaxViTForImageClassification  # noqa: E402
from vit_flax.checkpointing import restore_train_state, save_train_state, saved_steps  # noqa: E402
from vit_flax.training import make_train_step  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, image_size=32,
            patch_size=8, num_labels=3)


def _tx() -> optax.GradientTransformation:
    return optax.adamw(1e-2, weight_decay=0.05)  # a large lr: every weight moves visibly in 2 steps


def _batches(n: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{"pixel_values": rng.standard_normal((4, 3, 32, 32)).astype(np.float32),
             "labels": rng.integers(0, 3, 4).astype(np.int32)} for _ in range(n)]


def _assert_trees_equal(actual, expected) -> None:
    """Same structure, and every leaf equal to the bit with the same dtype."""
    assert jax.tree_util.tree_structure(actual) == jax.tree_util.tree_structure(expected)
    for (path, a), e in zip(jax.tree_util.tree_flatten_with_path(actual)[0], jax.tree_util.tree_leaves(expected)):
        assert np.asarray(a).dtype == np.asarray(e).dtype, jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.asarray(a), np.asarray(e), err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def run():
    """4 AdamW steps straight, and the state after 2 of them."""
    model = FlaxViTForImageClassification(ViTConfig(**TINY))
    tx, batches = _tx(), _batches(4)
    step = make_train_step(model, tx)
    params, opt_state = model.params, tx.init(model.params)
    states = []
    for batch in batches:
        params, opt_state, _ = step(params, opt_state, batch)
        states.append((params, opt_state))
    return dict(batches=batches, step=step, after2=states[1], after4=states[3])


def test_resume_from_orbax_state_is_bit_exact(run, tmp_path):
    """2 steps, save, restore (abstract templates, as a fresh process has), 2 more == 4 straight, every weight and
    every optimizer moment to the bit: the restored state is the saved one exactly, and the jitted step is
    deterministic on CPU. The run's own step function continues; restored arrays must not make it compile again
    (orbax's device-committed arrays did: a second ~6-15 s compilation)."""
    params, opt_state = run["after2"]
    folder = save_train_state(tmp_path, params=params, opt_state=opt_state, step=2, epoch=1, history=[0.5, 0.25])
    assert folder == tmp_path / "2" and saved_steps(tmp_path) == [2]
    template = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    state = restore_train_state(tmp_path, params_template=template,
                                opt_state_template=jax.eval_shape(_tx().init, template))
    assert state["step"] == 2 and state["epoch"] == 1 and state["history"] == [0.5, 0.25]
    _assert_trees_equal(state["params"], params)
    _assert_trees_equal(state["opt_state"], opt_state)  # optax's named tuples, count's int32 included
    params, opt_state = state["params"], state["opt_state"]
    compiled = run["step"]._cache_size()
    for batch in run["batches"][2:]:
        params, opt_state, _ = run["step"](params, opt_state, batch)
    assert run["step"]._cache_size() == compiled, "the restored state made the train step compile again"
    _assert_trees_equal(params, run["after4"][0])
    _assert_trees_equal(opt_state, run["after4"][1])


def test_restore_keeps_dtypes_and_never_casts(tmp_path):
    """bf16 / int32 leaves come back as they were; a template of another dtype is refused, not cast."""
    params = {"dense": {"kernel": jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 3) / 7,
                        "bias": jnp.array([1e-3, -2.5], jnp.float32)}, "ids": jnp.array([3, -1], jnp.int32)}
    tx = optax.adamw(1e-3)
    save_train_state(tmp_path, params=params, opt_state=tx.init(params), step=0)
    raw = restore_train_state(tmp_path)  # no templates: orbax's plain trees (dicts, lists)
    _assert_trees_equal(raw["params"], params)
    assert isinstance(raw["opt_state"], list) and set(raw["opt_state"][0]) == {"count", "mu", "nu"}
    wrong = {**params, "dense": {**params["dense"], "kernel": params["dense"]["kernel"].astype(jnp.float32)}}
    with pytest.raises(ValueError, match=r"params/dense/kernel: saved shape \(2, 3\) dtype bfloat16, template "
                                         r"shape \(2, 3\) dtype float32"):
        restore_train_state(tmp_path, params_template=wrong)
    with pytest.raises(ValueError, match=r"only in the template \['extra'\]"):
        restore_train_state(tmp_path, params_template={**params, "extra": jnp.zeros(1)})


def test_steps_latest_and_bad_arguments(tmp_path):
    params, opt = {"w": jnp.ones(2)}, ()
    for step in (1, 3, 5):
        save_train_state(tmp_path, params={"w": params["w"] * step}, opt_state=opt, step=step, max_to_keep=2)
    assert saved_steps(tmp_path) == [3, 5]  # the two newest; 1 deleted
    assert float(restore_train_state(tmp_path)["params"]["w"][0]) == 5.0
    assert restore_train_state(tmp_path, step=3)["step"] == 3
    with pytest.raises(ValueError, match=r"step 1 is not saved .* saved steps: \[3, 5\]"):
        restore_train_state(tmp_path, step=1)
    with pytest.raises(ValueError, match="step 5 is already saved"):
        save_train_state(tmp_path, params=params, opt_state=opt, step=5)
    with pytest.raises(ValueError, match="step 4 is older than the latest step 5 saved"):
        save_train_state(tmp_path, params=params, opt_state=opt, step=4)
    with pytest.raises(ValueError, match="step must be a non-negative int, got -1"):
        save_train_state(tmp_path, params=params, opt_state=opt, step=-1)
    with pytest.raises(TypeError, match="extra metadata rng=.* is not JSON-serialisable"):
        save_train_state(tmp_path, params=params, opt_state=opt, step=9, rng=np.zeros(2))
    with pytest.raises(FileNotFoundError, match="no training-state directory"):
        restore_train_state(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no saved training state"):
        restore_train_state(tmp_path / "empty")


_CRASH = textwrap.dedent("""
    import os, sys
    from pathlib import Path
    import numpy as np
    from orbax.checkpoint._src.path import async_path  # the rename that commits a step folder
    rename = async_path.rename
    async def crash(src, dst):
        if Path(dst).name == "3":  # every array of step 3 is written; die before it is committed
            os._exit(17)
        return await rename(src, dst)
    async_path.rename = crash
    from vit_flax.checkpointing import save_train_state
    save_train_state(sys.argv[1], params={"w": np.full(4, 3.0, np.float32)}, opt_state=(), step=3)
""")


def test_crash_mid_save_leaves_the_previous_state(tmp_path):
    """Orbax stages a step in ``<step>.orbax-checkpoint-tmp`` and renames it last: a process killed just
    before that rename leaves step 2 as the latest, intact; the next save removes the leftover."""
    w2 = np.full(4, 2.0, np.float32)
    save_train_state(tmp_path, params={"w": w2}, opt_state=(), step=2)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", _CRASH, str(tmp_path)], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    assert proc.returncode == 17, proc.stderr[-3000:]
    leftover = sorted(p.name for p in tmp_path.iterdir())
    assert leftover == ["2", "3.orbax-checkpoint-tmp"], leftover  # written to a temp folder, not committed
    assert saved_steps(tmp_path) == [2]
    state = restore_train_state(tmp_path)
    assert state["step"] == 2
    np.testing.assert_array_equal(np.asarray(state["params"]["w"]), w2)
    save_train_state(tmp_path, params={"w": w2 + 2}, opt_state=(), step=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "3"]
    np.testing.assert_array_equal(np.asarray(restore_train_state(tmp_path)["params"]["w"]), w2 + 2)


def test_orbax_state_to_canonical_checkpoint(run, tmp_path):
    """The documented way out: restored params → save_pretrained → from_pretrained gives the same weights."""
    save_train_state(tmp_path / "state", params=run["after2"][0], opt_state=run["after2"][1], step=2)
    model = FlaxViTForImageClassification(ViTConfig(**TINY), _do_init=False)  # only its save_pretrained
    model.save_pretrained(tmp_path / "hf", params=restore_train_state(tmp_path / "state")["params"])
    _assert_trees_equal(FlaxViTForImageClassification.from_pretrained(tmp_path / "hf").params, run["after2"][0])


def test_missing_orbax_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "orbax.checkpoint", None)  # import orbax.checkpoint → ImportError
    with pytest.raises(ImportError, match=r"needs orbax-checkpoint \(pip install 'trivit\[export\]'\)"):
        save_train_state(tmp_path, params={}, opt_state=(), step=0)
