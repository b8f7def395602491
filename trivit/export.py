"""``trivit export MODEL_DIR OUT --format onnx|stablehlo|savedmodel|tflite``: a checkpoint folder to a deployable file.

Each format comes from the framework that writes it (ONNX from PyTorch, StableHLO from Flax, SavedModel and TFLite
from TF); the work is done by the public functions ``vit_torch.export_onnx``, ``vit_flax.export_stablehlo``,
``vit_tf.export_saved_model`` and ``vit_tf.export_tflite``, which write atomically. ``--verify`` runs the artifact
and the live model on a real photo (``--image``, else scikit-learn's ``china.jpg``), preprocessed with the folder's
processor, and prints the largest difference of every output.

Exit codes: 0 written (and, with ``--verify``, within the format's bound); 1 ``--verify`` found a difference above
the bound; 2 usage errors (no model folder, a format the framework cannot write, a model class with no exporter).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trivit.folders import (PREFIXES, UsageError, import_framework, load_pretrained, load_processor,
                            read_config_json, read_image)

__all__ = ["add_parser", "run", "FORMATS", "EXIT_OK", "EXIT_MISMATCH", "EXIT_USAGE"]

EXIT_OK, EXIT_MISMATCH, EXIT_USAGE = 0, 1, 2
#: config.json ``model_type`` -> vit_core config class name.
_CONFIGS = {"vit": "ViTConfig", "vit-hybrid": "ViTHybridConfig"}
#: The classes every exporter takes (PyTorch names; TF/Flax add their prefix).
CLASSES = ("ViTModel", "ViTForImageClassification", "ViTForMaskedImageModeling", "ViTHybridModel",
           "ViTHybridForImageClassification")


@dataclass(frozen=True)
class Format:
    """One export format: the framework that writes it, and how closely ``--verify`` must find it.

    ``rtol``: an output passes when ``max|artifact - live| <= rtol * max(1, max|live|)`` (the suite's
    magnitude-scaled fp32 rule); ``None``: the difference is printed, not judged (quantised weights)."""

    framework: str
    help: str
    rtol: float | None


#: ``--verify`` bounds. onnx / stablehlo / savedmodel run fp32 with other kernels than the live model (onnxruntime's
#: MLAS, an XLA program compiled elsewhere, TF's graph runtime): the suite's 1e-5, magnitude-scaled. TFLite's XNNPACK
#: kernels are further (tests/tolerances.py TFLITE_ATOL); dynamic-range quantisation changes the weights themselves.
FORMATS: dict[str, Format] = {
    "onnx": Format("torch", "ONNX (torch.onnx), run by onnxruntime", 1e-5),
    "stablehlo": Format("flax", "StableHLO (jax.export), symbolic batch", 1e-5),
    "savedmodel": Format("tf", "TF SavedModel: NCHW float and uint8 NHWC image signatures", 1e-5),
    "tflite": Format("tf", "TFLite flatbuffer (fp32, or --quantize dynamic-range), run by LiteRT", 1e-4),
}
QUANTIZE = ("dynamic-range",)


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``export`` on the ``trivit`` sub-command table."""
    p = sub.add_parser(
        "export", help="export a checkpoint folder to ONNX, StableHLO, SavedModel or TFLite",
        description="Export a checkpoint folder for serving. Formats: "
                    + "; ".join(f"{k} ({f.framework}): {f.help}" for k, f in FORMATS.items())
                    + ". Exit code 0: written; 1: --verify found a difference above the bound; 2: usage error.")
    p.add_argument("model", metavar="MODEL_DIR", help="checkpoint folder: config.json, weights, "
                                                      "preferably preprocessor_config.json")
    p.add_argument("out", metavar="OUT", help="the file (onnx, stablehlo, tflite) or folder (savedmodel) to write")
    p.add_argument("--format", required=True, choices=list(FORMATS))
    p.add_argument("--framework", choices=list(PREFIXES),
                   help="the framework that exports (default: the format's own; the only one that can write it)")
    p.add_argument("--dynamic-size", action="store_true",
                   help="onnx: dynamic height and width (position embeddings interpolated); the batch is always dynamic")
    p.add_argument("--quantize", choices=QUANTIZE, help="tflite: dynamic-range quantised weights (int8)")
    p.add_argument("--verify", action="store_true",
                   help="run the artifact and the model on a real photo, print the max difference of every output")
    p.add_argument("--image", metavar="PATH", help="the photo --verify uses (default: scikit-learn's china.jpg)")
    p.set_defaults(func=run)
    return p


# ------------------------------------------------------------------------------------ checks and loading
def _check_args(args: argparse.Namespace) -> str:
    """The framework to export with; every flag that does not apply to the format is a :class:`UsageError`."""
    fmt = FORMATS[args.format]
    framework = args.framework or fmt.framework
    if framework != fmt.framework:
        raise UsageError(f"--format {args.format} is written by {fmt.framework}, not --framework {framework} "
                         f"(load the checkpoint there: every framework reads the same folder)")
    if args.dynamic_size and args.format != "onnx":
        raise UsageError(f"--dynamic-size: only --format onnx has dynamic height and width; {args.format} takes "
                         "the config's image size (its batch is dynamic)")
    if args.quantize and args.format != "tflite":
        raise UsageError(f"--quantize {args.quantize}: only --format tflite is quantised")
    if args.image and not args.verify:
        raise UsageError("--image is the photo --verify uses; add --verify")
    return framework


def _load_config(folder: Path) -> tuple[str, Any]:
    """``(class name without the framework prefix, vit_core config)`` from ``folder/config.json``."""
    import vit_core
    from vit_core.config import ConfigError

    file, data = read_config_json(folder, "MODEL_DIR")
    model_type = data.get("model_type", "vit")
    if model_type not in _CONFIGS:
        raise UsageError(f"{file}: model_type {model_type!r} is not one trivit exports ({list(_CONFIGS)})")
    base = "ViTHybridModel" if model_type == "vit-hybrid" else "ViTModel"
    architectures = data.get("architectures") or [base]
    name = str(architectures[0]).removeprefix("TF").removeprefix("Flax")
    if name not in CLASSES:
        raise UsageError(f"{file}: architectures[0] is {architectures[0]!r}; trivit exports {list(CLASSES)}")
    try:
        config = getattr(vit_core, _CONFIGS[model_type]).from_pretrained(folder)
    except (ConfigError, ValueError, TypeError) as e:
        raise UsageError(f"{file}: {e}") from None
    return name, config


# ------------------------------------------------------------------------------------ export and run
def _export(args: argparse.Namespace, framework: str, model: Any, processor: Any) -> Path:
    """Write the artifact with the framework's public exporter; returns its path."""
    module = import_framework(framework)
    out = Path(args.out)
    if args.format == "onnx":
        return module.export_onnx(model, out, dynamic_size=args.dynamic_size)
    if args.format == "stablehlo":
        return module.export_stablehlo(model, out)
    if args.format == "savedmodel":
        return module.export_saved_model(model, out, processor=processor)
    return module.export_tflite(model, out, quantize=args.quantize and args.quantize.replace("-", "_"))


def _run_artifact(fmt: str, path: Path, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """The artifact's outputs on NCHW float32 ``pixels``, by output name (with the format's own runtime)."""
    if fmt == "onnx":
        import vit_torch

        return vit_torch.run_onnx(path, pixels)
    if fmt == "stablehlo":
        import vit_flax

        return vit_flax.load_stablehlo(path)(pixels)
    import vit_tf

    if fmt == "tflite":
        return vit_tf.run_tflite(path, pixels)
    import tensorflow as tf

    serve = tf.saved_model.load(str(path)).signatures[vit_tf.export.PIXELS_SIGNATURE]
    return {k: v.numpy() for k, v in serve(pixel_values=tf.constant(pixels)).items()}


def _run_live(framework: str, model: Any, pixels: np.ndarray, interpolate: bool) -> dict[str, np.ndarray]:
    """The live model's outputs (no hidden states / attentions), fp32 numpy, by field name."""
    kwargs = {"interpolate_pos_encoding": interpolate, "return_dict": True}
    if framework == "torch":
        import torch

        with torch.inference_mode():
            out = model.eval()(torch.from_numpy(pixels), **kwargs)
        return {k: v.float().numpy() for k, v in out.items()}
    if framework == "tf":
        out = model(pixels, training=False, **kwargs)
    else:
        out = model(pixels, **kwargs)
    return {k: np.asarray(v, dtype=np.float32) for k, v in out.items()}


def _photo(args: argparse.Namespace) -> tuple[str, Any]:
    if args.image:
        try:
            return args.image, read_image(Path(args.image))
        except ValueError as e:
            raise UsageError(f"--image {args.image}: {e}") from None
    try:
        from PIL import Image
        from sklearn.datasets import load_sample_image
    except ImportError:
        raise UsageError("--verify needs a photo: pass --image PATH (or install scikit-learn for its samples)") from None
    return "scikit-learn china.jpg", Image.fromarray(load_sample_image("china.jpg"))


def _inputs(args: argparse.Namespace, processor: Any, config: Any, image: Any) -> list[tuple[np.ndarray, bool]]:
    """``[(pixels (1, C, H, W), interpolate_pos_encoding), ...]``: the photo at the model's size, and with
    ``--dynamic-size`` also at a larger, non-square size (two more patches of height, four of width)."""
    pixels = np.asarray(processor(image, return_tensors="np").pixel_values, dtype=np.float32)
    cases = [(pixels, tuple(pixels.shape[2:]) != tuple(config.image_hw))]
    if args.dynamic_size and hasattr(processor, "size") and "height" in processor.size:
        h, w = config.image_hw
        gh, gw = config.feature_grid(h, w)
        ph, pw = h // gh, w // gw  # pixels per token (the patch; the hybrid's backbone stride times it)
        size = {"height": h + 2 * ph, "width": w + 4 * pw}
        cases.append((np.asarray(processor(image, size=size, return_tensors="np").pixel_values, np.float32), True))
    return cases


def _verify(args: argparse.Namespace, framework: str, model: Any, processor: Any, config: Any, path: Path) -> bool:
    """Print each output's max difference, artifact vs live model; whether all are within the format's bound."""
    fmt = FORMATS[args.format]
    rtol = None if args.quantize else fmt.rtol
    name, image = _photo(args)
    ok = True
    for pixels, interpolate in _inputs(args, processor, config, image):
        live = _run_live(framework, model, pixels, interpolate)
        got = _run_artifact(args.format, path, pixels)
        missing = sorted(set(live) - set(got) - {"hidden_states", "attentions"})
        if missing:
            print(f"verify: the artifact has no output {missing} (it has {sorted(got)})")
            ok = False
        for key in sorted(set(live) & set(got)):
            diff = float(np.max(np.abs(np.asarray(got[key], np.float32) - live[key])))
            bound = None if rtol is None else rtol * max(1.0, float(np.max(np.abs(live[key]))))
            verdict = "reported, not judged (quantised)" if bound is None else (
                f"bound {bound:.3g}: {'ok' if diff <= bound else 'TOO FAR'}")
            ok &= bound is None or diff <= bound
            print(f"verify: {name} at {pixels.shape[2]}x{pixels.shape[3]}: {key} max |difference| {diff:.3g} ({verdict})")
    return ok


def run(args: argparse.Namespace) -> int:
    """Export ``args.model`` to ``args.out``; with ``--verify`` compare the artifact with the model."""
    def note(line: str) -> None:
        print(f"trivit export: {line}", file=sys.stderr)

    try:
        framework = _check_args(args)
        folder = Path(args.model)
        class_name, config = _load_config(folder)
        processor = load_processor(folder, config, note)
        model, _ = load_pretrained(framework, class_name, folder, note, flag="MODEL_DIR")
        try:
            path = _export(args, framework, model, processor)
        except (ValueError, TypeError, NotImplementedError, ImportError) as e:  # the exporters' documented refusals
            raise UsageError(f"{PREFIXES[framework]}{class_name} to {args.format}: {e}") from None
    except UsageError as e:
        print(f"trivit export: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    size = sum(f.stat().st_size for f in ([path] if path.is_file() else path.rglob("*")) if f.is_file())
    print(f"wrote {path} ({args.format}, {PREFIXES[framework]}{class_name}, {size / 2**20:.1f} MiB)")
    if args.verify:
        try:
            ok = _verify(args, framework, model, processor, config, path)
        except UsageError as e:
            print(f"trivit export: error: {e}", file=sys.stderr)
            return EXIT_USAGE
        if not ok:
            note("--verify: the artifact differs from the model by more than the format's bound")
            return EXIT_MISMATCH
    return EXIT_OK
