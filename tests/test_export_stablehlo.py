"""vit_flax.export: StableHLO via jax.export, every Flax class, re-run in a fresh process against the live model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")

import jax.numpy as jnp  # noqa: E402

import vit_flax  # noqa: E402
from conftest import assert_outputs_close  # noqa: E402
from settings import ATOL  # noqa: E402
from tolerances import BF16_EXPORT_ATOL, HYBRID_SCALE_BY_MAGNITUDE  # noqa: E402
from vit_core.config import ViTConfig  # noqa: E402
from vit_core.config_hybrid import ViTHybridConfig  # noqa: E402
from vit_flax.export import export_stablehlo, load_stablehlo  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
#: One encoder layer: every op the export must carry is in it, at half the compile time of two (6 models are
#: compiled here, twice each in the fresh process).
TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=37, image_size=32,
            patch_size=8, encoder_stride=8, num_labels=5)
#: 3 BiT stages over a 48-px image: a 3×3 token grid (as test_hybrid_equivalence.py's tiny cases, one unit each).
BIT = dict(embedding_size=16, hidden_sizes=[32, 64, 128], depths=[1, 1, 1], num_groups=4, layer_type="bottleneck",
           global_padding="SAME", embedding_dynamic_padding=True)
HYBRID = {**TINY, "image_size": 48, "patch_size": 1, "backbone_config": BIT}
#: case → (class, config, constructor kwargs)
CASES = {
    "model": ("FlaxViTModel", ViTConfig(**TINY), {}),
    "cls": ("FlaxViTForImageClassification", ViTConfig(**TINY), {}),
    "mim": ("FlaxViTForMaskedImageModeling", ViTConfig(**TINY), {}),
    "hybrid-model": ("FlaxViTHybridModel", ViTHybridConfig(**HYBRID), {}),
    "hybrid-cls": ("FlaxViTHybridForImageClassification", ViTHybridConfig(**HYBRID), {}),
    "cls-bf16": ("FlaxViTForImageClassification", ViTConfig(**TINY), {"dtype": jnp.bfloat16}),
}
FIELDS = {"model": ["last_hidden_state", "pooler_output"], "cls": ["logits"], "mim": ["reconstruction"],
          "hybrid-model": ["last_hidden_state", "pooler_output"], "hybrid-cls": ["logits"], "cls-bf16": ["logits"]}
BATCHES = (1, 3)  # batch 1 is the first image of batch 3: one eager (live) run per model


def _model(cls_name: str, config, rng: np.random.Generator, **kwargs):
    """A model with random weights made by NumPy (the init traced, not compiled: a jitted init per model cost more
    than everything else in this file). Norm scales around 1, every other weight N(0, 0.1²)."""
    model = getattr(vit_flax, cls_name)(config, _do_init=False, **kwargs)
    shapes = jax.eval_shape(lambda: model.init_weights(jax.random.PRNGKey(0), model.input_shape))
    model.params = jax.tree_util.tree_map_with_path(
        lambda path, s: jnp.asarray((path[-1].key == "scale") + 0.1 * rng.standard_normal(s.shape), s.dtype), shapes)
    return model

# The fresh process: first the classifier through jax alone (no flax, no trivit: the file is self-contained),
# then every artifact through load_stablehlo, at each batch size.
_CHILD = textwrap.dedent("""
    import json, sys
    import numpy as np
    from jax import export
    folder = sys.argv[1]
    cases, batches = json.loads(sys.argv[2]), json.loads(sys.argv[3])
    with open(f"{folder}/cls.stablehlo", "rb") as fh:
        plain = export.deserialize(bytearray(fh.read()))
    raw = {k: np.asarray(v) for k, v in plain.call(np.load(f"{folder}/cls.x3.npy")).items()}
    assert not {"flax", "vit_flax", "vit_core"} & set(sys.modules), "the artifact needed more than jax"
    np.savez(f"{folder}/raw.cls.x3.npz", **raw)
    from vit_flax.export import load_stablehlo
    dtypes = {}
    for case in cases:
        model = load_stablehlo(f"{folder}/{case}.stablehlo")
        for b in batches:
            out = model(np.load(f"{folder}/{case}.x{b}.npy"))
            dtypes[f"{case}.x{b}"] = {k: str(v.dtype) for k, v in out.items()}
            np.savez(f"{folder}/got.{case}.x{b}.npz", **{k: v.astype(np.float32) for k, v in out.items()})  # bf16 exact
    with open(f"{folder}/dtypes.json", "w") as fh:
        json.dump(dtypes, fh)
""")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case exported with a symbolic batch, its live (eager) outputs, and what a fresh process computed.

    The fresh process starts as soon as the files are written and runs while this one computes the live outputs
    (both mostly compile: on two cores, the overlap halves the wall time)."""
    folder = tmp_path_factory.mktemp("stablehlo")
    rng = np.random.default_rng(0)
    models, inputs = {}, {}
    for case, (cls_name, config, kwargs) in CASES.items():
        model = models[case] = _model(cls_name, config, rng, **kwargs)
        assert export_stablehlo(model, folder / f"{case}.stablehlo") == folder / f"{case}.stablehlo"
        inputs[case] = rng.standard_normal((max(BATCHES), config.num_channels, *config.image_hw)).astype(np.float32)
        for b in BATCHES:
            np.save(folder / f"{case}.x{b}.npy", inputs[case][:b])
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, str(folder), json.dumps(list(CASES)), json.dumps(BATCHES)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    try:
        live = {}
        for case, model in models.items():
            out = {k: np.asarray(v) for k, v in model(inputs[case]).items()}
            live.update({(case, b): {k: v[:b] for k, v in out.items()} for b in BATCHES})
        _, stderr = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, stderr[-4000:]

    def got(name: str) -> dict[str, np.ndarray]:
        with np.load(folder / name) as npz:
            return {k: npz[k] for k in npz.files}

    return dict(folder=folder, models=models, live=live, got=got,
                dtypes=json.loads((folder / "dtypes.json").read_text()))


@pytest.mark.parametrize("case", [c for c in CASES if c != "cls-bf16"])
@pytest.mark.parametrize("batch", BATCHES)
def test_fresh_process_matches_live_model(exported, case, batch):
    """Deserialised in another process, at batch 1 and 3 from one symbolic-batch export: the live model's
    fields, fp32 atol (the hybrid magnitude-scaled, as in test_hybrid_equivalence.py)."""
    got, live = exported["got"](f"got.{case}.x{batch}.npz"), exported["live"][case, batch]
    assert sorted(got) == sorted(FIELDS[case])
    got = {k: got[k] for k in live}  # the file's dict comes back in key order; compare field by field
    assert set(exported["dtypes"][f"{case}.x{batch}"].values()) == {"float32"}
    assert_outputs_close(got, live, atol=ATOL, where=f"stablehlo vs live flax, {case} [batch {batch}]",
                         scale_by_magnitude=case.startswith("hybrid") and HYBRID_SCALE_BY_MAGNITUDE)


def test_plain_jax_runs_the_file_alone(exported):
    """jax.export.deserialize(...).call without flax or trivit loaded gives load_stablehlo's numbers exactly."""
    raw, got = exported["got"]("raw.cls.x3.npz"), exported["got"]("got.cls.x3.npz")
    assert list(raw) == ["logits"]
    np.testing.assert_array_equal(raw["logits"], got["logits"])


@pytest.mark.parametrize("batch", BATCHES)
def test_bf16_model_exports_and_runs(exported, batch):
    """dtype=bfloat16 compute: bf16 logits, within BF16_EXPORT_ATOL (magnitude-scaled) of the live (eager) model."""
    got, live = exported["got"](f"got.cls-bf16.x{batch}.npz"), exported["live"]["cls-bf16", batch]
    assert exported["dtypes"][f"cls-bf16.x{batch}"] == {"logits": "bfloat16"} and live["logits"].dtype == jnp.bfloat16
    # See BF16_EXPORT_ATOL in tolerances.py: eager rounds every op to bf16, the compiled export fuses them.
    assert_outputs_close(got, live, atol=BF16_EXPORT_ATOL, where=f"stablehlo vs live flax, bf16 [batch {batch}]",
                         scale_by_magnitude=True)


def test_mlir_text_beside_the_file(exported):
    """``path + ".mlir"``: readable StableHLO of the same module, symbolic batch, weights elided; no temp files."""
    folder = exported["folder"]
    text = (folder / "cls.stablehlo.mlir").read_text()
    for needle in ("func.func public @main(%arg0: tensor<?x3x32x32xf32>)", "stablehlo.dot_general",
                   "stablehlo.reduce", "stablehlo.rsqrt", 'jax.result_info = "result[\'logits\']"',
                   "dense_resource<__elided__>"):
        assert needle in text, needle
    assert (folder / "cls.stablehlo.mlir").stat().st_size < 2 * (folder / "cls.stablehlo").stat().st_size
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")], "a staged temp file was left behind"


def test_fixed_batch_and_input_checks(exported, tmp_path):
    """batch_size=2 fixes the batch; the loader casts float64 and names every wrong input before running."""
    model, folder = exported["models"]["cls"], exported["folder"]
    run = load_stablehlo(export_stablehlo(model, tmp_path / "b2.stablehlo", batch_size=2))
    assert run.input_shape == (2, 3, 32, 32) and run.output_names == ("logits",) and run.platforms == ("cpu",)
    x = np.load(folder / "cls.x3.npy")[:2].astype(np.float64)  # float64 in: cast to the exported float32
    live = {k: v[:2] for k, v in exported["live"]["cls", 3].items()}  # rows of the live batch-3 run
    assert_outputs_close(run(x), live, where="stablehlo vs live flax, fixed batch")
    with pytest.raises(ValueError, match=r"pixel_values must have shape \(2, 3, 32, 32\), got \(1, 3, 32, 32\)"):
        run(x[:1])
    with pytest.raises(ValueError, match=r"must have shape \(2, 3, 32, 32\), got \(2, 32, 32, 3\)"):
        run(x.transpose(0, 2, 3, 1))
    with pytest.raises(TypeError, match="pixel_values must be a float array, got dtype int64"):
        run(x.astype(np.int64))
    symbolic = load_stablehlo(folder / "cls.stablehlo")
    assert symbolic.input_shape == (None, 3, 32, 32) and symbolic.output_names == ("logits",)
    with pytest.raises(ValueError, match=r"shape \(b, 3, 32, 32\) \(b: any batch size\), got \(2, 3, 16, 16\)"):
        symbolic(np.zeros((2, 3, 16, 16), np.float32))
    with pytest.raises(ValueError, match="at least one image"):
        symbolic(np.zeros((0, 3, 32, 32), np.float32))


def test_bad_files_and_arguments(exported, tmp_path):
    model = exported["models"]["model"]
    model.save_pretrained(tmp_path / "hf")
    for bad in (tmp_path / "hf" / "model.safetensors", tmp_path / "hf" / "config.json"):
        with pytest.raises(ValueError, match=rf"'{bad}' is not a jax.export \(StableHLO\) artifact"):
            load_stablehlo(bad)
    with pytest.raises(FileNotFoundError):
        load_stablehlo(tmp_path / "missing.stablehlo")
    with pytest.raises(ValueError, match="batch_size must be a positive int or None .* got 0"):
        export_stablehlo(model, tmp_path / "x", batch_size=0)
    with pytest.raises(ValueError, match="platforms must be a non-empty sequence .* got 'cpu'"):
        export_stablehlo(model, tmp_path / "x", platforms="cpu")
    with pytest.raises(TypeError, match="model must be a vit_flax model .* got dict"):
        export_stablehlo({}, tmp_path / "x")
    # Lowering for another platform needs no such device; running it here is refused by name.
    other = load_stablehlo(export_stablehlo(model, tmp_path / "tpu.stablehlo", platforms=("tpu",)))
    with pytest.raises(ValueError, match=r"exported for platforms '\('tpu',\)' but it is used on"):
        other(np.zeros((1, 3, 32, 32), np.float32))
    assert not (tmp_path / "x").exists()


def test_missing_jax_export_is_named(tmp_path, monkeypatch):
    monkeypatch.delattr(jax, "export")
    monkeypatch.setitem(sys.modules, "jax.export", None)  # `from jax import export` → ImportError
    with pytest.raises(ImportError, match=r"needs jax >= 0.4.30 with jax.export \(pip install 'trivit\[flax\]'\)"):
        load_stablehlo(tmp_path / "any.stablehlo")
