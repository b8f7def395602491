"""``trivit bench``: the harness, not the speed (no timed assertions).

A ``--tiny`` PyTorch run of every section checks the JSON (each section there, positive numbers, ratio =
trivit / peer, roofline fractions from the FLOP formula, machine info), the table and the chart; trivit and
HF time the same function (their fp32 outputs agree at the cross-framework bound). Missing frameworks and
failing peers become rows that say so; bad names are argparse errors. TF and Flax run in the slow test.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import statistics

import pytest

import trivit.bench as tb
from settings import ATOL
from tolerances import BENCH_FLOP_RTOL
from trivit.cli import main
from vit_core import ViTConfig


def _run(tmp_path, capsys, *args: str) -> tuple[dict, str]:
    out = tmp_path / "bench.json"
    assert main(["bench", "--tiny", "--quiet", "--json", str(out), *args]) == 0
    return json.loads(out.read_text()), capsys.readouterr().out


def _measured(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["trivit"] is not None]


def _check_rows(doc: dict, sections: list[str]) -> None:
    """Every section asked for has measured rows; numbers positive; ratio = median(trivit) / median(peer)."""
    assert sorted(doc["results"]) == sorted(sections)
    for section in sections:
        rows = _measured(doc["results"][section])
        assert rows, f"{section}: no measured row in {doc['results'][section]}"
        for r in rows:
            for side in ("trivit", "peer"):
                s = r[side]
                if s is None:
                    continue
                assert all(v > 0 and math.isfinite(v) for v in s["values"]), (section, r)
                assert s["median"] == statistics.median(s["values"]) and s["min"] <= s["median"] <= s["max"]
            if r["peer"] is not None:
                assert r["ratio"] == pytest.approx(r["trivit"]["median"] / r["peer"]["median"], rel=1e-12)
            else:
                assert r["ratio"] is None


def test_tiny_pytorch_run_of_every_section(tmp_path, capsys):
    png = tmp_path / "ratios.png"
    doc, out = _run(tmp_path, capsys, "--frameworks", "pt", "--png", str(png))
    _check_rows(doc, list(tb.SECTIONS))
    res = doc["results"]

    roof: dict[str, float] = {}  # the best GEMM median per dtype (measured first and again at the end)
    for r in _measured(res["roofline"]):
        roof[r["dtype"]] = max(roof.get(r["dtype"], 0.0), r["trivit"]["median"] * 1e9)
    assert len(res["roofline"]) == 4 and doc["roofline"]["flops"] == roof and set(roof) == {"float32", "bfloat16"}

    config = tb.tiny_config()
    infer = [r for r in _measured(res["inference"]) if r["peer_name"] == "HF"]
    cases = {(r["model"], r["batch"], r["dtype"]) for r in infer}
    measured = ((1, "float32"), (8, "float32"), (8, "bfloat16"))
    assert cases == {(f"tiny {c}", b, d) for c in tb.CLASSES for b, d in measured}
    for r in infer:
        assert r["peer"] is not None and not r["note"], r
        flops = tb.forward_flops(config, head=r["model"].endswith("Classification"))
        assert r["flop_per_image"] == flops
        assert r["roofline_fraction"]["trivit"] == pytest.approx(r["trivit"]["median"] * flops / roof[r["dtype"]])
        if r["dtype"] == "float32":  # both sides ran the same weights: the same function was timed
            assert r["extra"]["max_abs_diff_vs_HF"] <= ATOL, r
    train = [r for r in _measured(res["train"]) if r["peer_name"] == "HF"]
    assert len(train) == 1
    assert train[0]["flop_per_image"] == tb.TRAIN_FLOP_FACTOR * tb.forward_flops(config, head=True)
    assert {r["unit"] for r in _measured(res["load"])} == {"s", "MB", "x weights"}
    assert all(r["peer"] is not None for r in _measured(res["load"]))
    procs = {r["model"]: r for r in res["processors"]}
    for name in ("ViTImageProcessor", "ViTHybridImageProcessor"):
        assert procs[name]["peer"] is not None and procs[name]["extra"]["max_abs_diff_vs_HF"] <= ATOL
    if importlib.util.find_spec("timm") is None:
        assert any(r["note"] == "timm not installed" for r in res["inference"]), res["inference"]

    machine = doc["machine"]
    assert machine["cores"] >= 1 and machine["cpu"]
    wanted = {"python", "numpy", "torch", "tensorflow", "keras", "jax", "flax", "transformers"}
    assert wanted <= set(machine["versions"])
    assert doc["command"] and doc["options"]["frameworks"] == ["pt"] and doc["mode"] == "tiny"

    header = out.splitlines()[0].split()
    assert header[:6] == ["section", "framework", "model", "batch", "dtype", "unit"] and "ratio" in header
    for section in tb.SECTIONS:
        assert any(line.startswith(section) for line in out.splitlines()), f"no {section} line in:\n{out}"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args, message", [
    (["--only", "roofline,bogus"], "unknown section 'bogus'; choose from roofline, inference, train, load, processors"),
    (["--frameworks", "pt,mxnet"], "unknown framework 'mxnet'; choose from pt, tf, flax"),
    (["--only", ","], "no section given"),
    (["--rounds", "0"], "expected a positive integer, got 0"),
    (["--quick", "--tiny"], "not allowed with argument"),
])
def test_bad_options_are_argparse_errors(capsys, args, message):
    with pytest.raises(SystemExit) as e:
        main(["bench", *args])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_png_without_matplotlib_stops_before_measuring(monkeypatch, capsys, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(tb.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    monkeypatch.setattr(tb, "bench", lambda *a, **k: pytest.fail("measured although --png cannot be written"))
    assert main(["bench", "--tiny", "--png", str(tmp_path / "x.png")]) == 2
    assert "--png needs matplotlib, which is not installed" in capsys.readouterr().err


def test_missing_framework_and_failing_peer_become_rows(monkeypatch):
    real_missing = tb._missing
    monkeypatch.setattr(tb, "_missing", lambda pkgs: ["tensorflow"] if "tensorflow" in pkgs else real_missing(pkgs))
    real_forward = tb._Torch.forward

    def forward(self, side, *args):
        if side == "HF":
            raise RuntimeError("peer exploded\nsecond line")
        return real_forward(self, side, *args)

    monkeypatch.setattr(tb._Torch, "forward", forward)
    plan = dataclasses.replace(tb.make_plan("tiny"), classes=("ViTForImageClassification",), batches=(1,),
                               bf16_batches=())
    rows = tb.bench(["inference"], ["pt", "tf"], plan)["results"]["inference"]
    tf_rows = [r for r in rows if r["framework"] == "tf"]
    assert len(tf_rows) == 1 and tf_rows[0]["note"] == "not installed (tensorflow)" and tf_rows[0]["trivit"] is None
    (hf,) = [r for r in rows if r["framework"] == "pt" and r["peer_name"] == "HF"]
    assert hf["trivit"]["median"] > 0 and hf["peer"] is None and hf["ratio"] is None
    assert hf["note"] == "HF: RuntimeError: peer exploded"


def test_forward_flops_of_vit_b16():
    """The issue's figure: ViT-B/16 at 224 with a 1000-label head, about 35.1 GFLOP per image."""
    flops = tb.forward_flops(ViTConfig.from_variant("B/16", num_labels=1000), head=True)
    assert flops == pytest.approx(35.1e9, rel=BENCH_FLOP_RTOL)


@pytest.mark.slow
def test_tiny_tf_and_flax_runs(tmp_path, capsys):
    """TF (Keras 3 vs tf-keras, XLA) and Flax: inference and the train step, compile rows included (minutes)."""
    doc, _ = _run(tmp_path, capsys, "--frameworks", "tf,flax", "--only", "inference,train")
    _check_rows(doc, ["inference", "train"])
    for section in ("inference", "train"):
        for fw in ("tf", "flax"):
            rows = [r for r in _measured(doc["results"][section]) if r["framework"] == fw]
            assert any(r["unit"] == "img/s" and r["peer"] is not None for r in rows), (section, fw, rows)
            assert any(r["unit"] == "s" and "XLA compile" in r["model"] for r in rows), (section, fw, rows)
            for r in rows:
                if r["dtype"] == "float32" and "max_abs_diff_vs_HF" in r["extra"]:
                    assert r["extra"]["max_abs_diff_vs_HF"] <= ATOL, r
