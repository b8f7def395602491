"""ONNX export of the PyTorch models, and a runner for the exported files (onnxruntime, CPU).

Shapes: B batch, C channels, H×W image, N patches, S = N + 1 tokens, D hidden size. The graph takes NCHW
float32 ``pixel_values`` (B, C, H, W) and, for :class:`ViTForMaskedImageModeling`, ``bool_masked_pos``
(B, N) bool; it returns the model's output fields by name (``last_hidden_state`` (B, S, D) and
``pooler_output``; ``logits`` (B, num_labels); ``reconstruction`` (B, C, H, W)), no hidden states or
attentions. The batch axis is dynamic unless ``batch_size`` is given; ``dynamic_size=True`` makes height
and width dynamic too (the graph resizes the position embeddings, ``interpolate_pos_encoding=True``).

Facts about the export (what was measured, which exporter is the default and why) are in docs/export.md.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vit_core.atomic import atomic_write

from .modeling_utils import TorchPreTrainedModel
from .modeling_vit import ViTForImageClassification, ViTForMaskedImageModeling, ViTModel

__all__ = ["export_onnx", "run_onnx", "EXPORTERS"]

#: ``exporter`` values; "auto" is the dynamo exporter, falling back to TorchScript where dynamo fails.
EXPORTERS = ("auto", "dynamo", "torchscript")
#: Opsets each exporter writes: dynamo translates to opset 18+ (onnxscript); TorchScript stops at 20, and
#: needs 17 for LayerNormalization as one op (lower opsets would decompose it; not tested, not offered).
_OPSETS = {"dynamo": range(18, 24), "torchscript": range(17, 21)}
#: Key of the ONNX metadata entry (JSON) that :func:`run_onnx` reads to check inputs.
_META_KEY = "trivit"
_PROTOBUF_LIMIT = 2**31 - 1  # one ModelProto cannot exceed 2 GB; ViT-B/16 is 346 MB, ViT-H/14 2.5 GB


def _output_names(model: TorchPreTrainedModel) -> list[str]:
    if isinstance(model, ViTForMaskedImageModeling):
        return ["reconstruction"]
    if isinstance(model, ViTForImageClassification):  # the hybrid classifier is a subclass
        return ["logits"]
    if isinstance(model, ViTModel):  # ViTHybridModel too
        return ["last_hidden_state"] + (["pooler_output"] if model.pooler is not None else [])
    raise TypeError(
        f"export_onnx: model must be a ViTModel, ViTForImageClassification, ViTForMaskedImageModeling, "
        f"ViTHybridModel or ViTHybridForImageClassification, got {type(model).__name__}"
    )


class _Graph(nn.Module):
    """The exported function: (pixel_values[, bool_masked_pos]) → the model's output fields, as a tuple."""

    def __init__(self, model: TorchPreTrainedModel, outputs: list[str], interpolate: bool, with_mask: bool):
        super().__init__()
        self.model, self.outputs, self.interpolate, self.with_mask = model, outputs, interpolate, with_mask

    def forward(self, pixel_values: torch.Tensor, bool_masked_pos: torch.Tensor | None = None) -> tuple:
        kwargs = {"bool_masked_pos": bool_masked_pos} if self.with_mask else {}
        out = self.model(pixel_values, interpolate_pos_encoding=self.interpolate, return_dict=True, **kwargs)
        return tuple(out[name] for name in self.outputs)


def _size_dependent_padding(config: Any) -> bool:
    """The hybrid's BiT pads by the input's size (TF "SAME" on strided convs, the stem's dynamic max-pool pad)."""
    bit = getattr(config, "bit", None)
    return bit is not None and (bit.global_padding == "SAME" or bool(bit.embedding_dynamic_padding))


def _min_size(config: Any) -> tuple[int, int]:
    """Smallest H and W whose token grid is at least 2 along that axis: what torch.export proves the graph for
    (its size-1 specialisations of reshapes are excluded); the same bound is kept for TorchScript."""
    h0, w0 = config.image_hw
    limit = 64 * max(h0, w0)
    h = next((n for n in range(1, limit) if config.feature_grid(n, w0)[0] >= 2), None)
    w = next((n for n in range(1, limit) if config.feature_grid(h0, n)[1] >= 2), None)
    if h is None or w is None:  # not reachable for a valid config; kept as a clear message
        raise ValueError(f"export_onnx: no input size below {limit} gives a 2×2 token grid for this config")
    return h, w


def _check_args(model: Any, batch_size: Any, opset: Any, exporter: Any) -> None:
    if not isinstance(model, TorchPreTrainedModel):
        raise TypeError(f"export_onnx: model must be a vit_torch model (torch.nn.Module), got {type(model).__name__}")
    if exporter not in EXPORTERS:
        raise ValueError(f"export_onnx: exporter must be one of {list(EXPORTERS)}, got {exporter!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"export_onnx: batch_size must be a positive int or None (dynamic), got {batch_size!r}")
    if opset is not None:
        allowed = sorted(set().union(*_OPSETS.values())) if exporter == "auto" else list(_OPSETS[exporter])
        if isinstance(opset, bool) or not isinstance(opset, int) or opset not in allowed:
            raise ValueError(
                f"export_onnx: opset must be an int in {allowed[0]}..{allowed[-1]} for exporter={exporter!r} "
                f"(dynamo {_OPSETS['dynamo'][0]}..{_OPSETS['dynamo'][-1]}, torchscript "
                f"{_OPSETS['torchscript'][0]}..{_OPSETS['torchscript'][-1]}), got {opset!r}"
            )
    if model.dtype != torch.float32:
        raise ValueError(f"export_onnx exports float32 models; got {model.dtype} (call model.float() first)")


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _export_dynamo(graph: _Graph, args: tuple, dims: dict[str, dict[int, Any]], names: list[str],
                   outputs: list[str], opset: int | None) -> Any:
    from torch.export import Dim

    made: dict[str, Any] = {}  # one Dim per name: the mask's batch is the image's

    def dim(name: str, lo: int | None, step: int) -> Any:
        if lo is None:
            return Dim.AUTO
        if name not in made:  # a multiple of ``step``: Dim over the multiples, times step
            made[name] = Dim(name, min=lo) if step == 1 else step * Dim(f"{name}_div{step}", min=-(-lo // step))
        return made[name]

    shapes = {k: {axis: dim(*spec) for axis, spec in d.items()} or None for k, d in dims.items()}
    # torch.export itself (not via torch.onnx): a shape it cannot keep dynamic is an error here, whereas
    # torch.onnx.export(dynamo=True) retries quietly and may hand back a graph fixed to the example's size.
    program = torch.export.export(graph, args, dynamic_shapes=shapes, strict=False)
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")  # "torchvision is not installed"
    level = registry.level
    registry.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():  # its progress lines
            warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecation notes
            onnx_program = torch.onnx.export(program, args, dynamo=True, input_names=names, output_names=outputs,
                                             opset_version=opset, optimize=True, verbose=False)
    finally:
        registry.setLevel(level)
    return onnx_program.model_proto


def _export_torchscript(graph: _Graph, args: tuple, dims: dict[str, dict[int, Any]], names: list[str],
                        outputs: list[str], opset: int | None) -> Any:
    import onnx

    axes = {k: {axis: spec[0] for axis, spec in d.items()} for k, d in dims.items() if d}
    axes.update({name: {0: "batch"} for name in outputs} if "pixel_values" in axes and 0 in axes["pixel_values"]
                else {})
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # TracerWarning: the input checks read sizes as Python ints at trace time (they hold for the example);
        # DeprecationWarning: torch announces the TorchScript exporter's removal. Neither concerns the graph.
        # UserWarning: its notes on BiT's weight standardisation (a batch_norm in training mode, exported as such)
        # and on constant folding. The file is checked, and the tests compare its outputs.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        torch.onnx.export(graph, args, buffer, dynamo=False, input_names=names, output_names=outputs,
                          dynamic_axes=axes, opset_version=opset or _OPSETS["torchscript"][-1])
    return onnx.load_from_string(buffer.getvalue())


def _rename_dims(proto: Any, dims: dict[str, dict[int, Any]]) -> None:
    """Give the inputs' dynamic axes their names (batch, height, width) everywhere in the graph."""
    rename: dict[str, str] = {}
    for value in proto.graph.input:
        for axis, (name, *_) in dims.get(value.name, {}).items():
            dim = value.type.tensor_type.shape.dim[axis]
            if dim.dim_param:
                rename[dim.dim_param] = name
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if dim.dim_param in rename:
                dim.dim_param = rename[dim.dim_param]


def _check_dynamic(proto: Any, dims: dict[str, dict[int, Any]], exporter: str) -> None:
    """Every axis asked to be dynamic is dynamic in the file (and the others are fixed)."""
    for value in proto.graph.input:
        shape = value.type.tensor_type.shape.dim
        for axis, dim in enumerate(shape):
            want = dims.get(value.name, {}).get(axis)
            if (want is not None) != bool(dim.dim_param):
                got = dim.dim_param or dim.dim_value
                raise RuntimeError(f"export_onnx ({exporter}): input {value.name!r} axis {axis} came out as {got!r}, "
                                   f"expected {'dynamic ' + want[0] if want else 'fixed'}")


def export_onnx(
    model: TorchPreTrainedModel,
    path: str | os.PathLike,
    *,
    dynamic_size: bool = False,
    batch_size: int | None = None,
    opset: int | None = None,
    exporter: str = "auto",
) -> Path:
    """Write ``model`` as an ONNX file at ``path`` (atomically) and return the path.

    Inputs ``pixel_values`` (B, C, H, W) float32 and, for ``ViTForMaskedImageModeling`` whose
    ``patch_size == encoder_stride``, ``bool_masked_pos`` (B, N) bool (all False: no masking; ``run_onnx``
    fills it in when omitted). Outputs: the model's fields (see the module docstring).

    ``batch_size``: None → dynamic batch axis; an int fixes it. ``dynamic_size``: dynamic H and W (at least a
    2×2 token grid), the position embeddings resized in the graph; otherwise H×W is ``config.image_size``.
    Refused (ValueError) for a hybrid whose backbone pads by the input's size (global_padding "SAME" or
    embedding_dynamic_padding). ``exporter``: "dynamo" (torch.export + onnxscript), "torchscript" (the
    legacy tracer), "auto" (dynamo, TorchScript if dynamo fails). ``opset``: None → the exporter's default.
    The file is checked with ``onnx.checker``; one file holds every weight (ONNX's protobuf limit is 2 GB).
    """
    _check_args(model, batch_size, opset, exporter)
    try:
        import onnx
    except ImportError as e:
        raise ImportError("export_onnx needs onnx and onnxscript: pip install 'trivit[export]'") from e
    config = model.config
    outputs = _output_names(model)
    if dynamic_size and _size_dependent_padding(config):
        raise ValueError(
            "export_onnx: dynamic_size=True is not supported for this hybrid: its BiT backbone pads by the input's "
            f"size (backbone_config.global_padding={config.bit.global_padding!r}, embedding_dynamic_padding="
            f"{config.bit.embedding_dynamic_padding}), which neither exporter can keep symbolic (torch.export does "
            "not finish, the tracer fixes the pads); export at config.image_size "
            f"{config.image_hw} with dynamic_size=False"
        )
    with_mask = isinstance(model, ViTForMaskedImageModeling) and config.patch_size == config.encoder_stride
    h, w = config.image_hw
    min_h, min_w = _min_size(config) if dynamic_size else (h, w)
    if dynamic_size:  # an example away from the config's grid, so that no size-specific shortcut is traced
        h, w = max(h + config.patch_size, min_h), max(w + 2 * config.patch_size, min_w)
    # The ViT takes whole patches only (vit_core.checks; MIM's loss compares the (H // p)·p high reconstruction
    # with the image): dynamic sizes are multiples of p. The hybrid's patches tile its feature map, any image size.
    step = config.patch_size if dynamic_size and getattr(config, "bit", None) is None else 1
    min_h, min_w, h, w = (-(-n // step) * step for n in (min_h, min_w, h, w))
    b = batch_size or 2  # a dynamic axis needs an example other than 0 and 1
    device = model.device
    pixel_values = torch.zeros(b, config.num_channels, h, w, device=device)
    args: tuple = (pixel_values,)
    batch = {} if batch_size else {0: ("batch", 1, 1)}
    size = {2: ("height", min_h, step), 3: ("width", min_w, step)} if dynamic_size else {}
    dims = {"pixel_values": {**batch, **size}}
    names = ["pixel_values"]
    if with_mask:
        gh, gw = config.feature_grid(h, w)
        args += (torch.zeros(b, gh * gw, dtype=torch.bool, device=device),)
        # N = (H // p)·(W // p) is not an independent size: torch.export derives it (Dim.AUTO, min None).
        dims["bool_masked_pos"] = {**batch, **({1: ("num_patches", None, 1)} if dynamic_size else {})}
        names.append("bool_masked_pos")
    graph = _Graph(model, outputs, interpolate=dynamic_size, with_mask=with_mask)
    chosen = exporter
    if exporter == "auto":  # dynamo unless the opset asked for is TorchScript's alone
        chosen = "dynamo" if opset is None or opset in _OPSETS["dynamo"] else "torchscript"
    fallback = exporter == "auto" and chosen == "dynamo" and (opset is None or opset in _OPSETS["torchscript"])
    with _eval_mode(model), torch.no_grad():
        try:
            run = _export_dynamo if chosen == "dynamo" else _export_torchscript
            proto = run(graph, args, dims, names, outputs, opset)
        except Exception as e:  # noqa: BLE001 — "auto" tries the other exporter, whose file is checked the same way
            if not fallback:
                raise RuntimeError(f"export_onnx ({chosen}) failed for {type(model).__name__}: {e}") from e
            warnings.warn(f"export_onnx: the dynamo exporter failed for {type(model).__name__} ({type(e).__name__}: "
                          f"{str(e)[:300]}); exported with TorchScript instead", RuntimeWarning, stacklevel=2)
            chosen = "torchscript"
            proto = _export_torchscript(graph, args, dims, names, outputs, opset)
    _rename_dims(proto, dims)
    _check_dynamic(proto, dims, chosen)
    meta = {
        "model_class": type(model).__name__,
        "exporter": chosen,
        "dynamic_size": dynamic_size,
        "image_size": list(config.image_hw),
        "min_size": [min_h, min_w],
        "size_multiple": step,
        "patch_size": config.patch_size,
        "torch": torch.__version__,
    }
    proto.metadata_props.add(key=_META_KEY, value=json.dumps(meta))
    proto.producer_name = "trivit"
    data = proto.SerializeToString()
    if len(data) > _PROTOBUF_LIMIT:  # not reached by any released ViT below ViT-H; external data is not written
        raise ValueError(f"export_onnx: the model is {len(data) / 2**30:.1f} GiB; one ONNX file holds at most 2 GiB")
    onnx.checker.check_model(proto, full_check=True)
    path = Path(path)
    atomic_write(path, data)
    return path


# ---------------------------------------------------------------------------------------------- running

_SESSIONS: dict[tuple[str, int, int], Any] = {}


def _session(path: Path) -> Any:
    """One onnxruntime CPU session per file (and version of it: keyed by mtime and size)."""
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError("run_onnx needs onnxruntime: pip install 'trivit[export]'") from e
    if not path.is_file():
        raise FileNotFoundError(f"run_onnx: no ONNX file at {str(path)!r}")
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _SESSIONS:
        if len(_SESSIONS) >= 8:
            _SESSIONS.pop(next(iter(_SESSIONS)))
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only
        _SESSIONS[key] = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return _SESSIONS[key]


_DTYPES = {"tensor(float)": np.float32, "tensor(bool)": np.bool_}


def _check_input(name: str, array: np.ndarray, spec: Any, meta: dict) -> np.ndarray:
    want = _DTYPES.get(spec.type)
    if want is np.float32 and array.dtype != np.float32:
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"run_onnx: {name} must be a float array (float32), got dtype {array.dtype}")
        array = array.astype(np.float32)
    elif want is np.bool_ and array.dtype != np.bool_:
        if not (np.issubdtype(array.dtype, np.integer) and np.isin(array, (0, 1)).all()):
            raise TypeError(f"run_onnx: {name} must be a bool array (or 0/1 integers), got dtype {array.dtype}")
        array = array.astype(np.bool_)
    expected = tuple(d if isinstance(d, int) else str(d) for d in spec.shape)
    if array.ndim != len(expected) or any(isinstance(e, int) and e != a for e, a in zip(expected, array.shape)):
        raise ValueError(f"run_onnx: {name} must have shape {expected} (named axes are free), got {array.shape}")
    if name == "pixel_values" and meta.get("dynamic_size"):
        (min_h, min_w), (h, w) = meta["min_size"], array.shape[2:]
        if h < min_h or w < min_w:
            raise ValueError(f"run_onnx: pixel_values of size {h}*{w} is below the exported graph's minimum "
                             f"{min_h}*{min_w} (a 2×2 token grid)")
        step = meta.get("size_multiple", 1)
        if h % step or w % step:
            raise ValueError(f"run_onnx: pixel_values height and width must be multiples of the patch size "
                             f"{step}, got {h}*{w}")
    return np.ascontiguousarray(array)


def run_onnx(path: str | os.PathLike, pixel_values: np.ndarray, **inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Run a file from :func:`export_onnx` with onnxruntime (CPUExecutionProvider): ``{output name: array}``.

    ``pixel_values`` (B, C, H, W) float32 (other float dtypes are cast); further inputs by name, e.g.
    ``bool_masked_pos`` (B, N) bool, which defaults to all False (no masking) when the graph has it.
    Shapes and dtypes are checked against the graph first, so a wrong input gives a ValueError/TypeError
    naming it rather than an onnxruntime error.
    """
    session = _session(Path(path))
    meta = json.loads(session.get_modelmeta().custom_metadata_map.get(_META_KEY, "{}"))
    specs = {spec.name: spec for spec in session.get_inputs()}
    given = {"pixel_values": pixel_values, **inputs}
    unknown = sorted(set(given) - set(specs))
    if unknown:
        raise ValueError(f"run_onnx: unknown input(s) {unknown}; this graph takes {list(specs)}")
    feed = {name: _check_input(name, np.asarray(value), specs[name], meta) for name, value in given.items()}
    if "bool_masked_pos" in specs:
        b, _, h, w = feed["pixel_values"].shape
        p = meta.get("patch_size") or 1
        want = (b, (h // p) * (w // p))
        mask = feed.setdefault("bool_masked_pos", np.zeros(want, np.bool_))
        if mask.shape != want:
            raise ValueError(f"run_onnx: bool_masked_pos must have shape (batch, num_patches) = {want} for "
                             f"pixel_values {feed['pixel_values'].shape}, got {mask.shape}")
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feed)))
