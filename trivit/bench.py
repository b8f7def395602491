"""``trivit bench``: trivit against its peers (HF transformers 4.x; timm for PyTorch), measured in the same run.

Sections (``--only``; all by default):

* ``roofline``: large fp32 / bf16 GEMMs per framework, the machine's FLOP/s ceiling in this run;
* ``inference``: ``ViTModel`` / ``ViTForImageClassification`` forward, img/s (TF and Flax compiled with XLA;
  the first call, compilation included, reported apart);
* ``train``: one step (forward + backward + AdamW, cross-entropy), img/s;
* ``load``: ``from_pretrained`` of a canonical checkpoint, seconds and peak RSS, each in a fresh subprocess;
* ``processors``: image processors on real photos (scikit-learn's china.jpg / flower.jpg), img/s.

Every timed pair runs interleaved (warm-ups, then rounds trivit, peer, trivit, peer, ...) on the same inputs and
threads; a row gives the median and the min-max range over the rounds and ratio = trivit / peer of the row's
number. A framework (or peer) that is not installed, or a peer that fails, gives a row saying so, not a
traceback. Exit codes: 0 the run finished (failed rows are in the table); 2 usage errors. See docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from trivit.quiet import import_quietly, native_log_filter, quiet_frameworks

__all__ = ["add_parser", "run", "bench", "forward_flops", "Plan", "Row", "SECTIONS", "FRAMEWORKS",
           "TRAIN_FLOP_FACTOR"]

SECTIONS = ("roofline", "inference", "train", "load", "processors")
FRAMEWORKS = ("pt", "tf", "flax")
_ALIASES = {"torch": "pt", "pytorch": "pt", "tensorflow": "tf", "keras": "tf", "jax": "flax"}
#: framework -> (trivit's module, class-name prefix, the packages trivit's side needs)
_OURS = {"pt": ("vit_torch", "", ("torch",)), "tf": ("vit_tf", "TF", ("tensorflow", "keras")),
         "flax": ("vit_flax", "Flax", ("jax", "flax", "optax"))}
#: framework -> the packages HF's side needs (TF and Flax read a PyTorch checkpoint through torch: from_pt=True)
_HF_NEEDS = {"pt": ("transformers", "torch"), "tf": ("transformers", "tf_keras", "torch"),
             "flax": ("transformers", "flax", "optax", "torch")}
CLASSES = ("ViTModel", "ViTForImageClassification")
#: A training step costs about 3 forward passes (backward: 2 matmuls per forward matmul).
TRAIN_FLOP_FACTOR = 3.0
#: Versions recorded in the JSON (distribution names).
_VERSIONED = ("numpy", "torch", "tensorflow", "keras", "tf_keras", "jax", "jaxlib", "flax", "optax", "transformers",
              "timm", "pillow", "safetensors")
LR = 1e-4  #: AdamW learning rate of the train step (both sides)


# ------------------------------------------------------------------------------------------------ what to run
@dataclass(frozen=True)
class Plan:
    """What one run measures. ``models``: inference configs by display name; ``bf16_batches``: the batch sizes
    measured in bf16 (fp32 runs every one of ``batches``); ``min_round_s``: each side repeats its call within a
    round until this long has passed; ``skipped``: what this mode leaves out, said in the table."""

    mode: str
    models: dict[str, Any]
    classes: tuple[str, ...]
    batches: tuple[int, ...]
    bf16_batches: tuple[int, ...]
    train_model: str
    train_batch: int
    load_model: str
    processor_images: int
    gemm_n: int
    rounds: int
    warmup: int
    load_rounds: int
    min_round_s: float
    train_frameworks: tuple[str, ...] = FRAMEWORKS
    load_frameworks: tuple[str, ...] = FRAMEWORKS
    #: intra-op threads for PyTorch and TF (None: their defaults; JAX always uses XLA's, all cores)
    threads: int | None = None
    skipped: tuple[str, ...] = ()

    def config(self, name: str) -> Any:
        from vit_core.config import ViTConfig

        return self.models.get(name) or ViTConfig.from_variant(name.removeprefix("ViT-"), num_labels=1000)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["models"] = {k: v.to_dict() for k, v in self.models.items()}
        return out


def tiny_config() -> Any:
    """The tests' tiny classifier: hidden 32, 2 layers, 4 heads, MLP 64, 32x32 images, patch 8, 10 labels."""
    from vit_core.config import ViTConfig

    return ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     image_size=32, patch_size=8, num_labels=10)


def make_plan(mode: str, rounds: int | None = None, warmup: int | None = None, threads: int | None = None) -> Plan:
    """The plan of ``mode``: "full" (ViT-S/16 and ViT-B/16), "quick" (ViT-S/16, a subset meant for a couple of
    minutes on a 2-core CPU, all three frameworks) or "tiny" (tiny configs, seconds: for tests and CI)."""
    from vit_core.config import ViTConfig

    def variant(name: str) -> Any:
        return ViTConfig.from_variant(name, num_labels=1000)

    if mode == "tiny":
        plan = Plan("tiny", {"tiny": tiny_config()}, CLASSES, (1, 8), (8,), "tiny", 8, "tiny", 8, 128,
                    rounds=2, warmup=1, load_rounds=1, min_round_s=0.0, threads=1)
    elif mode == "quick":
        plan = Plan("quick", {"ViT-S/16": variant("S/16")}, ("ViTForImageClassification",), (1, 8), (8,),
                    "ViT-S/16", 8, "ViT-S/16", 64, 1024, rounds=3, warmup=1, load_rounds=1, min_round_s=0.2,
                    train_frameworks=("pt",), load_frameworks=("pt",),
                    skipped=("ViT-B/16 (inference; load measures ViT-S/16)", "ViTModel (the classifier only)",
                             "bf16 at batch 1"))
    else:
        plan = Plan("full", {"ViT-S/16": variant("S/16"), "ViT-B/16": variant("B/16")}, CLASSES, (1, 8), (1, 8),
                    "ViT-S/16", 8, "ViT-B/16", 64, 2048, rounds=7, warmup=2, load_rounds=3, min_round_s=0.5)
    changes: dict[str, Any] = {}
    if rounds is not None:
        changes["rounds"] = changes["load_rounds"] = rounds
    if warmup is not None:
        changes["warmup"] = warmup
    if threads is not None:
        changes["threads"] = threads
    return Plan(**{**plan.__dict__, **changes}) if changes else plan


def forward_flops(config: Any, *, head: bool) -> float:
    """FLOPs (2 x multiply-adds) of one image's forward pass at ``config.image_hw``, matmuls only: the patch
    embedding, per layer the q/k/v/output projections, the two attention products (T x T x D each) and the MLP,
    and with ``head`` the classifier on [CLS]. Norms, softmax, GELU and additions are left out (<1%).
    ViT-B/16 at 224 with 1000 labels: 35.1 GFLOP."""
    n, d, m, p = config.num_patches, config.hidden_size, config.intermediate_size, config.patch_size
    t = n + 1
    layer = 4 * t * d * d + 2 * t * t * d + 2 * t * d * m
    head_macs = d * config.num_labels if head else 0
    return 2.0 * (n * config.num_channels * p * p * d + config.num_hidden_layers * layer + head_macs)


# ------------------------------------------------------------------------------------------------ results
@dataclass
class Row:
    """One measurement: per-round values of trivit and of the peer (``peer_name``: "HF", "timm" or "" for none),
    in ``unit``. ``flop_per_image`` (inference, train) gives the roofline fraction; ``note`` says why a side is
    missing; ``extra`` holds further raw numbers (e.g. max |difference| of the two sides' outputs)."""

    section: str
    framework: str
    model: str
    batch: int | None
    dtype: str
    unit: str
    peer_name: str = ""
    trivit: list[float] = field(default_factory=list)
    peer: list[float] = field(default_factory=list)
    note: str = ""
    higher_is_better: bool = True
    flop_per_image: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ratio(self) -> float | None:
        """median(trivit) / median(peer), or None when a side is missing."""
        if not self.trivit or not self.peer:
            return None
        return statistics.median(self.trivit) / statistics.median(self.peer)

    def fraction(self, values: list[float], roofline: dict[str, float]) -> float | None:
        """Achieved FLOP/s of ``values`` (img/s) over the machine's GEMM FLOP/s in this row's dtype."""
        peak = roofline.get(self.dtype)
        if not values or not peak or not self.flop_per_image:
            return None
        return statistics.median(values) * self.flop_per_image / peak

    def to_dict(self, roofline: dict[str, float]) -> dict[str, Any]:
        def stats(v: list[float]) -> dict[str, Any] | None:
            return {"median": statistics.median(v), "min": min(v), "max": max(v), "values": v} if v else None

        out = asdict(self)
        out |= {"trivit": stats(self.trivit), "peer": stats(self.peer), "ratio": self.ratio,
                "roofline_fraction": {"trivit": self.fraction(self.trivit, roofline),
                                      "peer": self.fraction(self.peer, roofline)}}
        return out


class _Report:
    """Rows as they come, each said on stderr when ``verbose``."""

    def __init__(self, verbose: bool) -> None:
        self.rows: list[Row] = []
        self.verbose = verbose

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        if self.verbose:
            print(f"trivit bench: {_one_line(row)}", file=sys.stderr, flush=True)
        return row


def _one_line(row: Row) -> str:
    cells = [row.section, row.framework, row.model, f"b{row.batch}" if row.batch else "", row.dtype,
             _cell(row.trivit), f"{row.peer_name} {_cell(row.peer)}" if row.peer_name else "", row.unit, row.note]
    return " ".join(c for c in cells if c)


def _why(e: BaseException) -> str:
    """One line for a failure: the exception type and the first line of its message."""
    text = str(e).strip().splitlines()
    first = text[0].split(". ")[0][:160] if text else ""
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _say(side: str, reason: str) -> str:
    """``"timm not installed"``, ``"HF: ValueError: ..."``: a side's reason as the table says it."""
    return f"{side} {reason}" if reason.startswith("not installed") else f"{side}: {reason}"


def _missing(packages: Sequence[str]) -> list[str]:
    return [p for p in packages if importlib.util.find_spec(p) is None]


# ------------------------------------------------------------------------------------------------ timing
#: A side's call: runs one unit of work and returns once its result exists (its output, for the |diff| check).
Call = Callable[[], Any]


def interleaved(sides: dict[str, Call], work: float, plan: Plan) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Time ``sides`` against each other: ``plan.warmup`` untimed calls each (the first one is timed apart, as
    ``first_s``: XLA compiles there), then ``plan.rounds`` rounds in which every side in turn repeats its call
    until ``plan.min_round_s`` has passed (at least once). Returns ``(work units per second per round by side,
    {"first_s": {side: s}, "outputs": {side: first output}})``. A side that raises is dropped (its error under
    ``"errors"``)."""
    first, outputs, errors, per_call = {}, {}, {}, {}
    for name, call in list(sides.items()):
        try:
            t0 = time.perf_counter()
            outputs[name] = call()
            first[name] = time.perf_counter() - t0
            t = first[name]
            for _ in range(max(0, plan.warmup - 1)):
                t0 = time.perf_counter()
                call()
                t = time.perf_counter() - t0
            per_call[name] = t
        except Exception as e:  # noqa: BLE001 - a failing side becomes a note in its row
            errors[name] = _why(e)
    alive = {k: v for k, v in sides.items() if k in per_call}
    values: dict[str, list[float]] = {k: [] for k in alive}
    reps = {k: max(1, math.ceil(plan.min_round_s / max(per_call[k], 1e-9))) for k in alive}
    for _ in range(plan.rounds):
        for name, call in list(alive.items()):
            try:
                t0, n = time.perf_counter(), 0
                while n < reps[name] or time.perf_counter() - t0 < plan.min_round_s:
                    call()
                    n += 1
                values[name].append(n * work / (time.perf_counter() - t0))
            except Exception as e:  # noqa: BLE001
                errors[name] = _why(e)
                del alive[name]
                values.pop(name)
    return values, {"first_s": first, "outputs": outputs, "errors": errors}


def _max_diff(a: Any, b: Any) -> float | None:
    try:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        return float(np.max(np.abs(a - b))) if a.shape == b.shape and a.size else None
    except (TypeError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------ frameworks
class _Torch:
    """PyTorch: trivit's vit_torch, HF's ViT*, timm's VisionTransformer; every call returns a float32 numpy."""

    name = "pt"

    def __init__(self, threads: int | None) -> None:
        import torch

        self.torch = torch
        self._threads = torch.get_num_threads()
        if threads:
            torch.set_num_threads(threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
            torch.backends.cudnn.allow_tf32 = False

    def _dtype(self, dtype: str) -> Any:
        return getattr(self.torch, dtype)

    def threads(self) -> int:
        return self.torch.get_num_threads()

    def close(self) -> None:
        self.torch.set_num_threads(self._threads)

    def gemm(self, dtype: str, n: int) -> Call:
        torch = self.torch
        a = torch.randn(n, n, device=self.device).to(self._dtype(dtype))
        sync = torch.cuda.synchronize if self.device == "cuda" else (lambda: None)

        def call() -> None:
            torch.matmul(a, a)
            sync()

        return call

    def forward(self, side: str, cls: str, folder: Path, config: Any, dtype: str) -> Callable[[np.ndarray], Call]:
        torch = self.torch
        td = self._dtype(dtype)
        kw = {"add_pooling_layer": False} if cls == "ViTModel" else {}
        if side == "timm":
            model, pick = _timm_model(cls, config), (lambda out: out)
            model = model.to(self.device, td).eval()
            run = model.forward_features if cls == "ViTModel" else model
        else:
            lib = import_quietly("vit_torch") if side == "trivit" else _transformers()
            with _expected_load_warnings():
                model = getattr(lib, cls).from_pretrained(folder, dtype=td, **kw).to(self.device).eval()
            attr = "last_hidden_state" if cls == "ViTModel" else "logits"
            pick = lambda out: getattr(out, attr)  # noqa: E731
            run = lambda x: model(pixel_values=x)  # noqa: E731

        def bind(pixels: np.ndarray) -> Call:
            x = torch.from_numpy(pixels).to(self.device, td)

            def call() -> np.ndarray:
                with torch.inference_mode():
                    return pick(run(x)).float().cpu().numpy()

            return call

        return bind

    def train_step(self, side: str, folder: Path, config: Any, pixels: np.ndarray, labels: np.ndarray) -> Call:
        torch = self.torch
        if side == "timm":
            model = _timm_model("ViTForImageClassification", config).to(self.device).train()
            loss_of = lambda x, y: torch.nn.functional.cross_entropy(model(x), y)  # noqa: E731
        else:
            lib = import_quietly("vit_torch") if side == "trivit" else _transformers()
            model = lib.ViTForImageClassification.from_pretrained(folder).to(self.device).train()
            loss_of = lambda x, y: model(pixel_values=x, labels=y).loss  # noqa: E731
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        x = torch.from_numpy(pixels).to(self.device)
        y = torch.from_numpy(labels.astype(np.int64)).to(self.device)

        def call() -> float:
            opt.zero_grad(set_to_none=True)
            loss = loss_of(x, y)
            loss.backward()
            opt.step()
            return float(loss.detach())

        return call


def _timm_model(cls: str, config: Any) -> Any:
    """timm's VisionTransformer of ``config``'s sizes (timm's own random init; [CLS] pooling); no head for
    ViTModel (then ``forward_features`` gives the normed tokens, as ViTModel's last_hidden_state)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=config.image_hw, patch_size=config.patch_size, in_chans=config.num_channels,
                             num_classes=config.num_labels if cls != "ViTModel" else 0, embed_dim=config.hidden_size,
                             depth=config.num_hidden_layers, num_heads=config.num_attention_heads,
                             mlp_ratio=config.intermediate_size / config.hidden_size, qkv_bias=config.qkv_bias,
                             global_pool="token")


@contextlib.contextmanager
def _expected_load_warnings() -> Iterator[None]:
    """ViTModel loaded from the classifier checkpoint: "classifier.* not used" is expected; nothing else is said."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(not used|were not used|newly initialized).*")
        yield


def _transformers() -> Any:
    """transformers, its warnings and logging quiet."""
    warnings.filterwarnings("ignore", module=r"transformers(\.|$)")
    warnings.filterwarnings("ignore", message=r".*(TensorFlow and JAX classes are deprecated|`resume_download`).*")
    transformers = import_quietly("transformers")
    transformers.logging.set_verbosity_error()
    return transformers


class _TF:
    """TF: trivit's Keras 3 models and HF's tf-keras ones, each called through ``tf.function(jit_compile=True)``;
    bf16 is each Keras' ``mixed_bfloat16`` policy while the model is built."""

    name = "tf"

    def __init__(self, threads: int | None) -> None:
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")  # HF's TF models are tf-keras ones: tf.keras must be too
        self.tf = import_quietly("tensorflow")
        self.keras = import_quietly("keras")
        if threads:
            with contextlib.suppress(RuntimeError):  # TF's runtime already started: its threads stay
                self.tf.config.threading.set_intra_op_parallelism_threads(threads)

    def threads(self) -> int:
        """0: TF's default (all cores)."""
        return self.tf.config.threading.get_intra_op_parallelism_threads()

    def close(self) -> None:
        pass

    def gemm(self, dtype: str, n: int) -> Call:
        tf = self.tf
        with native_log_filter():
            a = tf.cast(tf.random.normal((n, n)), dtype)
        return lambda: tf.matmul(a, a).shape  # eager ops run synchronously on the CPU

    @contextlib.contextmanager
    def _policy(self, side: str, dtype: str) -> Iterator[None]:
        mp = (self.keras if side == "trivit" else import_quietly("tf_keras")).mixed_precision
        previous = mp.global_policy()
        mp.set_global_policy("mixed_bfloat16" if dtype == "bfloat16" else "float32")
        try:
            yield
        finally:
            mp.set_global_policy(previous)

    def _load(self, side: str, cls: str, folder: Path, dtype: str) -> Any:
        kw = {"add_pooling_layer": False} if cls == "ViTModel" else {}
        with self._policy(side, dtype), native_log_filter(), _expected_load_warnings():
            if side == "trivit":
                return getattr(import_quietly("vit_tf"), "TF" + cls).from_pretrained(folder, **kw)
            return getattr(_transformers(), "TF" + cls).from_pretrained(folder, from_pt=True, **kw)

    def forward(self, side: str, cls: str, folder: Path, config: Any, dtype: str) -> Callable[[np.ndarray], Call]:
        tf = self.tf
        model = self._load(side, cls, folder, dtype)
        attr = "last_hidden_state" if cls == "ViTModel" else "logits"
        fn = tf.function(lambda x: tf.cast(getattr(model(pixel_values=x, training=False), attr), tf.float32),
                         jit_compile=True)

        def bind(pixels: np.ndarray) -> Call:
            x = tf.constant(pixels)
            return lambda: fn(x).numpy()

        return bind

    def train_step(self, side: str, folder: Path, config: Any, pixels: np.ndarray, labels: np.ndarray) -> Call:
        model = self._load(side, "ViTForImageClassification", folder, "float32")
        optimizers = (self.keras if side == "trivit" else import_quietly("tf_keras")).optimizers
        model.compile(optimizer=optimizers.AdamW(learning_rate=LR), jit_compile=True)  # the model's own loss
        batch = {"pixel_values": pixels, "labels": labels.astype(np.int32)}
        return lambda: float(np.asarray(model.train_on_batch(batch)).reshape(-1)[0])


class _Flax:
    """JAX/Flax: trivit's vit_flax and HF's FlaxViT*, each forward and train step under ``jax.jit``."""

    name = "flax"

    def __init__(self, threads: int | None) -> None:  # noqa: ARG002 - XLA's CPU threads are fixed at start-up
        self.jax = import_quietly("jax")
        self.jnp = self.jax.numpy

    def threads(self) -> int:
        return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1

    def close(self) -> None:
        pass

    def gemm(self, dtype: str, n: int) -> Call:
        jax, jnp = self.jax, self.jnp
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32).astype(dtype)
        f = jax.jit(jnp.matmul)
        return lambda: f(a, a).block_until_ready()

    def _load(self, side: str, cls: str, folder: Path, dtype: str) -> Any:
        kw: dict[str, Any] = {"dtype": getattr(self.jnp, dtype)}
        if cls == "ViTModel":
            kw["add_pooling_layer"] = False
        with _expected_load_warnings():
            if side == "trivit":
                return getattr(import_quietly("vit_flax"), "Flax" + cls).from_pretrained(folder, **kw)
            return getattr(_transformers(), "Flax" + cls).from_pretrained(folder, from_pt=True, **kw)

    def forward(self, side: str, cls: str, folder: Path, config: Any, dtype: str) -> Callable[[np.ndarray], Call]:
        jax, jnp = self.jax, self.jnp
        model = self._load(side, cls, folder, dtype)
        attr = "last_hidden_state" if cls == "ViTModel" else "logits"
        fn = jax.jit(lambda p, x: getattr(model(x, params=p), attr).astype(jnp.float32))
        params = model.params

        def bind(pixels: np.ndarray) -> Call:
            x = jnp.asarray(pixels)
            return lambda: np.asarray(fn(params, x))

        return bind

    def train_step(self, side: str, folder: Path, config: Any, pixels: np.ndarray, labels: np.ndarray) -> Call:
        jax, jnp = self.jax, self.jnp
        import optax

        model = self._load(side, "ViTForImageClassification", folder, "float32")
        tx = optax.adamw(LR)

        def step(params: Any, opt_state: Any, x: Any, y: Any) -> tuple[Any, Any, Any]:
            def loss_fn(p: Any) -> Any:
                logits = model(x, params=p).logits
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

            loss, grads = jax.value_and_grad(loss_fn)(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        jitted = jax.jit(step)  # the same loss and optimizer written out for both (HF's Flax ViT takes no labels)
        state = [model.params, tx.init(model.params)]
        x, y = jnp.asarray(pixels), jnp.asarray(labels.astype(np.int32))

        def call() -> float:
            state[0], state[1], loss = jitted(state[0], state[1], x, y)
            return float(loss)

        return call


_BACKENDS: dict[str, Callable[[], Any]] = {"pt": _Torch, "tf": _TF, "flax": _Flax}


# ------------------------------------------------------------------------------------------------ checkpoints
def random_tensors(config: Any, model_class: str = "ViTForImageClassification",
                   seed: int = 0) -> dict[str, Callable[[], np.ndarray]]:
    """Canonical name -> zero-argument maker of that tensor (float32, by the weight table's initialiser kind:
    ones / zeros / normal x 0.02), each seeded by its position, so a checkpoint is built tensor by tensor."""
    from vit_core.weights import Init, param_specs

    def make(i: int, shape: tuple[int, ...], init: Any) -> Callable[[], np.ndarray]:
        if init is Init.ONES:
            return lambda: np.ones(shape, np.float32)
        if init is Init.ZEROS:
            return lambda: np.zeros(shape, np.float32)
        return lambda: np.random.default_rng(seed + i).standard_normal(shape, dtype=np.float32) * np.float32(0.02)

    return {s.name: make(i, s.shape, s.init) for i, s in enumerate(param_specs(model_class, config))}


def write_random_checkpoint(folder: Path, config: Any, model_class: str = "ViTForImageClassification") -> int:
    """A canonical checkpoint (config.json + model.safetensors, HF-loadable) of random weights; returns its
    weights' byte size."""
    from vit_core.checkpoint import write_checkpoint
    from vit_core.pretrained import saved_config_dict
    from vit_core.weights import param_specs

    write_checkpoint(folder, random_tensors(config, model_class), saved_config_dict(config, model_class, "float32"))
    return 4 * sum(math.prod(s.shape) for s in param_specs(model_class, config))


# ------------------------------------------------------------------------------------------------ sections
class _Bench:
    def __init__(self, plan: Plan, frameworks: Sequence[str], report: _Report, work: Path) -> None:
        self.plan, self.frameworks, self.report, self.work = plan, list(frameworks), report, work
        self.backends: dict[str, Any] = {}
        self.unavailable: dict[str, str] = {}
        self.roofline: dict[str, float] = {}  # dtype -> best GEMM FLOP/s of this run
        self.gemm: dict[str, dict[str, float]] = {}  # framework -> dtype -> median FLOP/s
        self.threads: dict[str, int] = {}
        self._folders: dict[str, Path] = {}
        self.weight_bytes: dict[str, int] = {}

    # -- plumbing
    def backend(self, fw: str) -> Any | None:
        """The framework's driver, or None (the reason in ``unavailable``)."""
        if fw in self.backends or fw in self.unavailable:
            return self.backends.get(fw)
        module, _, needs = _OURS[fw]
        missing = _missing(needs)
        if missing:
            self.unavailable[fw] = f"not installed ({', '.join(missing)})"
            return None
        try:
            if fw != "pt":
                quiet_frameworks()
            import_quietly(module)
            self.backends[fw] = _BACKENDS[fw](self.plan.threads)
            self.threads[fw] = self.backends[fw].threads()
        except Exception as e:  # noqa: BLE001 - a framework that does not load is a row, not a traceback
            self.unavailable[fw] = f"does not load: {_why(e)}"
            return None
        return self.backends[fw]

    def folder(self, model: str) -> Path:
        """The canonical checkpoint of ``model`` (ViTForImageClassification, random weights), written once."""
        if model not in self._folders:
            path = self.work / model.replace("/", "_")
            self.weight_bytes[model] = write_random_checkpoint(path, self.plan.config(model))
            self._folders[model] = path
        return self._folders[model]

    def peers(self, section: str, fw: str) -> list[str]:
        """The peers of ``fw`` that are installed; each one that is not gets one row in ``section``."""
        needs = {"HF": _HF_NEEDS[fw], **({"timm": ("timm",)} if fw == "pt" else {})}
        out = []
        for peer, packages in needs.items():
            missing = _missing(packages)
            if missing:
                why = "not installed" if missing == [peer] else f"not installed ({', '.join(missing)})"
                self.report.add(Row(section, fw, "*", None, "*", "", peer, note=_say(peer, why)))
            else:
                out.append(peer)
        return out

    def unavailable_row(self, section: str, fw: str, unit: str) -> None:
        self.report.add(Row(section, fw, "*", None, "*", unit, note=self.unavailable[fw]))

    # -- roofline
    def run_roofline(self, when: str = "") -> None:
        """GEMM GFLOP/s per framework and dtype; the run's roofline of a dtype is the best median seen (the
        section runs first and, when other sections followed, again at the end: load on a shared machine drifts)."""
        n = self.plan.gemm_n
        for fw in self.frameworks:
            be = self.backend(fw)
            if be is None:
                if not when:
                    self.unavailable_row("roofline", fw, "GFLOP/s")
                continue
            for dtype in ("float32", "bfloat16"):
                row = Row("roofline", fw, f"GEMM {n}x{n}{when}", None, dtype, "GFLOP/s")
                try:
                    values, info = interleaved({"trivit": be.gemm(dtype, n)}, 2.0 * n**3 / 1e9, self.plan)
                except Exception as e:  # noqa: BLE001
                    values, info = {}, {"errors": {"trivit": _why(e)}}
                row.trivit = values.get("trivit", [])
                row.note = info["errors"].get("trivit", "")
                if row.trivit:
                    flops = statistics.median(row.trivit) * 1e9
                    best = self.gemm.setdefault(fw, {})
                    best[dtype] = max(best.get(dtype, 0.0), flops)
                    self.roofline[dtype] = max(self.roofline.get(dtype, 0.0), flops)
                self.report.add(row)
        for r in self.report.rows:
            if r.section == "roofline" and r.trivit:
                r.extra["fraction_of_roofline"] = statistics.median(r.trivit) * 1e9 / self.roofline[r.dtype]

    # -- inference
    def run_inference(self) -> None:
        plan = self.plan
        rng = np.random.default_rng(0)
        for fw in self.frameworks:
            be = self.backend(fw)
            if be is None:
                self.unavailable_row("inference", fw, "img/s")
                continue
            peers = self.peers("inference", fw)
            for model_name in plan.models:
                config, folder = plan.config(model_name), self.folder(model_name)
                for cls, dtype in [(c, d) for c in plan.classes for d in ("float32", "bfloat16")]:
                    batches = plan.batches if dtype == "float32" else plan.bf16_batches
                    notes: dict[str, str] = {}
                    binders = self._build(["trivit", *peers], notes,
                                          lambda side: be.forward(side, cls, folder, config, dtype))
                    for batch in batches:
                        pixels = rng.standard_normal((batch, config.num_channels, *config.image_hw), dtype=np.float32)
                        calls = self._build(list(binders), notes, lambda side: binders[side](pixels))
                        values, info = interleaved(calls, batch, plan)
                        self._rows("inference", fw, f"{model_name} {cls}", batch, dtype,
                                   forward_flops(config, head=cls != "ViTModel"), values, info, notes, peers)
                    binders.clear()
                    gc.collect()

    @staticmethod
    def _build(sides: list[str], notes: dict[str, str], make: Callable[[str], Any]) -> dict[str, Any]:
        """``{side: make(side)}`` for the sides whose ``make`` works; the others' errors go to ``notes``."""
        out = {}
        for side in sides:
            if side in notes:
                continue
            try:
                out[side] = make(side)
            except Exception as e:  # noqa: BLE001 - a side that fails to build is a note in its rows
                notes[side] = _why(e)
        return out

    def _rows(self, section: str, fw: str, model: str, batch: int, dtype: str, flops: float,
              values: dict[str, list[float]], info: dict[str, Any], notes: dict[str, str], peers: list[str]) -> None:
        """One img/s row per peer (trivit's rounds in each; one row without a peer when none is installed) and,
        for TF and Flax (XLA), one row of first-call seconds (compilation included) per peer."""
        notes |= info["errors"]
        ours, first = values.get("trivit", []), info["first_s"]
        for peer in peers or [""]:
            why = "; ".join(_say(side, notes[side]) for side in ("trivit", peer) if side in notes)
            row = self.report.add(Row(section, fw, model, batch, dtype, "img/s", peer, ours, values.get(peer, []),
                                      note=why, flop_per_image=flops))
            if peer == "HF":
                diff = _max_diff(info["outputs"].get("trivit"), info["outputs"].get("HF"))
                if diff is not None:
                    row.extra["max_abs_diff_vs_HF"] = diff
            if fw != "pt" and ("trivit" in first or peer in first):
                self.report.add(Row(section, fw, f"{model} first call (XLA compile)", batch, dtype, "s", peer,
                                    [first["trivit"]] if "trivit" in first else [],
                                    [first[peer]] if peer in first else [], note=why, higher_is_better=False))

    # -- train
    def run_train(self) -> None:
        plan = self.plan
        name, batch = plan.train_model, plan.train_batch
        config = plan.config(name)
        rng = np.random.default_rng(1)
        pixels = rng.standard_normal((batch, config.num_channels, *config.image_hw), dtype=np.float32)
        labels = rng.integers(0, config.num_labels, batch)
        model = f"{name} train step (AdamW)"
        for fw in self.frameworks:
            be = self.backend(fw)
            if be is None:
                self.unavailable_row("train", fw, "img/s")
                continue
            if fw not in plan.train_frameworks:
                self.report.add(Row("train", fw, model, batch, "float32", "img/s",
                                    note=f"skipped in --{plan.mode} (the step's XLA compilation takes minutes here)"))
                continue
            peers = self.peers("train", fw)
            folder, notes = self.folder(name), {}
            calls = self._build(["trivit", *peers], notes,
                                lambda side: be.train_step(side, folder, config, pixels, labels))
            values, info = interleaved(calls, batch, plan)
            self._rows("train", fw, model, batch, "float32", TRAIN_FLOP_FACTOR * forward_flops(config, head=True),
                       values, info, notes, peers)
            calls.clear()
            gc.collect()

    # -- load
    def run_load(self) -> None:
        name = self.plan.load_model
        for fw in self.frameworks:
            missing = _missing(_OURS[fw][2])
            if missing:
                self.report.add(Row("load", fw, "*", None, "*", "s", note=f"not installed ({', '.join(missing)})"))
                continue
            if fw not in self.plan.load_frameworks:
                self.report.add(Row("load", fw, f"{name} ViTForImageClassification from_pretrained", None, "float32",
                                    "s", note=f"skipped in --{self.plan.mode} (each fresh {fw} process, one per "
                                              "side and round, takes ~15 s to start)", higher_is_better=False))
                continue
            folder = self.folder(name)
            weights = self.weight_bytes[name]
            hf_missing = _missing(_HF_NEEDS[fw])  # timm reads no HF checkpoint: HF is the only peer here
            runs: dict[str, list[dict[str, Any]]] = {"trivit": [], "HF": []}
            errors = {"HF": f"not installed ({', '.join(hf_missing)})"} if hf_missing else {}
            for _ in range(self.plan.load_rounds):
                for side in runs:
                    if side in errors:
                        continue
                    out = _load_in_child(fw, side, folder)
                    if "error" in out:
                        errors[side] = out["error"]
                    else:
                        runs[side].append(out)
            note = "; ".join(_say(k, v) for k, v in errors.items())
            mb = 2**20
            cls = "ViTForImageClassification"
            for unit, of in (("s", lambda r: r["seconds"]), ("MB", lambda r: (r["peak"] - r["base"]) / mb),
                             ("x weights", lambda r: (r["peak"] - r["base"]) / weights)):
                what = "from_pretrained" if unit == "s" else "peak RSS - baseline"
                row = Row("load", fw, f"{name} {cls} {what}", None, "float32", unit, "HF",
                          [of(r) for r in runs["trivit"]], [of(r) for r in runs["HF"]], note=note,
                          higher_is_better=False)
                row.extra = {"weights_bytes": weights, "raw": {k: v for k, v in runs.items()}}
                self.report.add(row)

    # -- processors
    def run_processors(self) -> None:
        import vit_core

        n = self.plan.processor_images
        images = _sample_images(n)
        hf_missing = _missing(["transformers"])
        hf = None if hf_missing else _transformers()
        for name in ("ViTImageProcessor", "ViTHybridImageProcessor", "ViTImageProcessorFast"):
            row = Row("processors", "core", name, n, "float32", "img/s", "HF")
            calls: dict[str, Call] = {}
            why: list[str] = []
            ours = getattr(vit_core, name, None)
            if ours is None:
                why.append(f"trivit: vit_core has no {name}")
            else:
                proc = ours()
                calls["trivit"] = lambda p=proc: p(images, return_tensors="np")["pixel_values"]
            if hf is None:
                why.append(_say("HF", f"not installed ({', '.join(hf_missing)})"))
            else:
                try:
                    theirs = getattr(hf, name)()
                    calls["HF"] = lambda p=theirs: np.asarray(p(images, return_tensors="np")["pixel_values"])
                except Exception as e:  # noqa: BLE001 - e.g. HF's fast processor needs torchvision
                    why.append(_say("HF", _why(e)))
            values, info = interleaved(calls, n, self.plan)
            why += [_say(k, v) for k, v in info["errors"].items()]
            row.trivit, row.peer, row.note = values.get("trivit", []), values.get("HF", []), "; ".join(why)
            diff = _max_diff(info["outputs"].get("trivit"), info["outputs"].get("HF"))
            if diff is not None:
                row.extra["max_abs_diff_vs_HF"] = diff
            self.report.add(row)


def _sample_images(n: int) -> list[Any]:
    """scikit-learn's two sample photos (china.jpg 427x640, flower.jpg 427x640), alternating, as ``n`` PIL images."""
    from PIL import Image
    from sklearn.datasets import load_sample_image

    photos = [Image.fromarray(load_sample_image(name)) for name in ("china.jpg", "flower.jpg")]
    return [photos[i % 2].copy() for i in range(n)]


#: The load measurement's child: import the library and the framework and run one trivial op (so framework
#: start-up is in the baseline), collect garbage (a light import leaves a full collection pending, ~0.12 s measured
#: for vit_torch, which the first from_pretrained would pay and a heavy import like transformers' has already
#: paid), note VmRSS, reset the peak (Linux: ``clear_refs`` 5), time from_pretrained, read
#: every weight once (summed: memory-mapped weights count once touched, as they are by the first forward), then
#: read the peak. The peak is VmHWM, the same high-water mark ru_maxrss reports, but of this process's own memory
#: only: after fork + exec, ru_maxrss also keeps the parent's RSS at the fork (a benchmark process holding three
#: frameworks: gigabytes). Where /proc is missing, ru_maxrss it is (``peak_source`` says which).
_LOAD_CHILD = textwrap.dedent("""
    import json, os, resource, sys, time, warnings
    warnings.filterwarnings("ignore")
    fw, side, folder = sys.argv[1:4]
    def status(field):
        try:
            with open("/proc/self/status") as f:
                return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ":"))
        except (OSError, StopIteration):
            return None
    def maxrss():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    try:
        if side == "HF":
            import transformers
            transformers.logging.set_verbosity_error()
            import torch  # HF's TF / Flax classes read a PyTorch checkpoint through torch (from_pt=True)
            lib, kw = transformers, ({} if fw == "pt" else {"from_pt": True})
        else:
            import importlib
            lib, kw = importlib.import_module({"pt": "vit_torch", "tf": "vit_tf", "flax": "vit_flax"}[fw]), {}
        if fw == "pt":
            import torch; torch.zeros(1).add_(1)
        elif fw == "tf":
            import tensorflow as tf; (tf.zeros(1) + 1).numpy()
        else:
            import jax.numpy as jnp; (jnp.zeros(1) + 1).block_until_ready()
        import gc; gc.collect()  # the imports leave a full collection pending; it must not land in one side's timing
        cls = getattr(lib, {"pt": "", "tf": "TF", "flax": "Flax"}[fw] + "ViTForImageClassification")
        base = status("VmRSS") or maxrss()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            reset = True
        except OSError:
            reset = False
        t0 = time.perf_counter()
        model = cls.from_pretrained(folder, **kw)
        seconds = time.perf_counter() - t0
        t0 = time.perf_counter()  # read every weight once: a lazily memory-mapped load must not look free
        if fw == "pt":
            sum(float(p.sum()) for p in model.parameters())
        elif fw == "tf":
            sum(float(tf.reduce_sum(v)) for v in model.weights)
        else:
            import jax
            sum(float(jnp.sum(x)) for x in jax.tree_util.tree_leaves(model.params))
        touch = time.perf_counter() - t0
        hwm = status("VmHWM")
        out = {"seconds": seconds, "touch_s": touch, "base": base, "peak": hwm or maxrss(), "ru_maxrss": maxrss(),
               "peak_source": ("VmHWM" if hwm else "ru_maxrss") + (" (reset after imports)" if reset else "")}
    except Exception as e:
        out = {"error": f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}"}
    print("@@" + json.dumps(out), flush=True)
""")


def _load_in_child(fw: str, side: str, folder: Path) -> dict[str, Any]:
    """Run :data:`_LOAD_CHILD` in a fresh interpreter; its ``{"seconds", "base", "peak"}`` or ``{"error"}``."""
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "TF_USE_LEGACY_KERAS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    if fw == "pt":  # transformers would import TF and JAX too when installed (before the baseline: time only)
        env |= {"USE_TF": "0", "USE_FLAX": "0", "USE_JAX": "0"}
    proc = subprocess.run([sys.executable, "-c", _LOAD_CHILD, fw, side, str(folder)], env=env, capture_output=True,
                          text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("@@")]
    if not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()
        return {"error": f"child exited {proc.returncode}: {tail[-1][:200] if tail else 'no output'}"}
    return json.loads(lines[-1][2:])


# ------------------------------------------------------------------------------------------------ report
def _cell(values: list[float]) -> str:
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{med:.4g}" if len(values) == 1 else f"{med:.4g} [{min(values):.4g}-{max(values):.4g}]"


def table(rows: Sequence[Row], roofline: dict[str, float]) -> str:
    """The aligned text table: one row per measurement."""
    head = ("section", "framework", "model", "batch", "dtype", "unit", "trivit [min-max]", "peer", "peer [min-max]",
            "ratio", "roofline", "note")
    lines = [head]
    for r in rows:
        frac = r.fraction(r.trivit, roofline)
        lines.append((r.section, r.framework, r.model, str(r.batch or ""), r.dtype,
                      r.unit + (" (lower better)" if not r.higher_is_better else ""), _cell(r.trivit), r.peer_name,
                      _cell(r.peer) if r.peer_name else "", f"{r.ratio:.3f}" if r.ratio is not None else "-",
                      f"{100 * frac:.1f}%" if frac is not None else "", r.note))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)).rstrip() for line in lines)


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, platform and the versions of python and the frameworks (``None``: not installed)."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for dist in _VERSIONED:
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            versions[dist] = None
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "cores": os.cpu_count(), "usable_cores": usable, "platform": platform.platform(),
            "versions": versions}


def write_png(rows: Sequence[Row], path: Path, title: str) -> None:
    """Horizontal bars of trivit / peer per row (1 = parity): throughput rows (higher is better) on the left,
    seconds and memory (lower is better) on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in rows if r.ratio is not None and r.unit != "x weights"]  # x weights: the MB row's ratio
    groups = [[r for r in shown if r.higher_is_better == up] for up in (True, False)]
    groups = [g for g in groups if g]
    if not groups:
        groups = [[]]
    height = max(3.0, 0.28 * max(len(g) for g in groups) + 1.5)
    fig, axes = plt.subplots(1, len(groups), figsize=(8 * len(groups), height), squeeze=False)
    for ax, group in zip(axes[0], groups):
        labels = [f"{r.framework} {r.model}{f' b{r.batch}' if r.batch else ''} {r.dtype} [{r.unit}] vs {r.peer_name}"
                  for r in group]
        ratios = [r.ratio for r in group]
        up = not group or group[0].higher_is_better
        ax.barh(range(len(group)), ratios, color=["tab:green" if (x >= 1) == up else "tab:red" for x in ratios])
        ax.axvline(1.0, color="black", linewidth=1)
        ax.set_yticks(range(len(group)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlabel("trivit / peer" + ("  (higher is better)" if up else "  (lower is better)"))
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------ entry points
def bench(sections: Sequence[str], frameworks: Sequence[str], plan: Plan, verbose: bool = False) -> dict[str, Any]:
    """Run ``sections`` for ``frameworks`` under ``plan``; returns the document ``--json`` writes (``rows`` holds
    the :class:`Row` objects under ``"_rows"``)."""
    report = _Report(verbose)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="trivit-bench-") as tmp:
        b = _Bench(plan, frameworks, report, Path(tmp))
        for s in plan.skipped:
            report.add(Row("skipped", "*", s, None, "", "", note=f"not measured in --{plan.mode}"))
        seconds: dict[str, float] = {}
        try:
            for section in SECTIONS:
                if section in sections:
                    t = time.perf_counter()
                    getattr(b, f"run_{section}")()
                    seconds[section] = time.perf_counter() - t
            if "roofline" in sections and len(sections) > 1:
                t = time.perf_counter()
                b.run_roofline(" (end of run)")
                seconds["roofline"] += time.perf_counter() - t
        finally:
            for backend in b.backends.values():
                backend.close()
    roofline = b.roofline
    return {"command": list(sys.argv), "mode": plan.mode, "sections": list(sections),
            "frameworks": list(frameworks), "seconds": time.perf_counter() - t0,
            "section_seconds": seconds, "machine": machine_info(),
            "threads": b.threads, "plan": plan.to_dict(), "roofline": {"flops": roofline, "by_framework": b.gemm},
            "flop_formula": "forward_flops(): 2 x matmul MACs per image; train = 3 x forward",
            "results": {s: [r.to_dict(roofline) for r in report.rows if r.section == s] for s in sections},
            "skipped": list(plan.skipped), "_rows": report.rows}


def _names(choices: Sequence[str], what: str, aliases: dict[str, str] | None = None) -> Callable[[str], list[str]]:
    """An argparse ``type``: a comma-separated list of ``choices`` (with ``aliases``), in the given order."""
    def parse(text: str) -> list[str]:
        out: list[str] = []
        for name in filter(None, (t.strip().lower() for t in text.split(","))):
            name = (aliases or {}).get(name, name)
            if name not in choices:
                raise argparse.ArgumentTypeError(f"unknown {what} {name!r}; choose from {', '.join(choices)}")
            if name not in out:
                out.append(name)
        if not out:
            raise argparse.ArgumentTypeError(f"no {what} given; choose from {', '.join(choices)}")
        return out

    return parse


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``bench`` on the ``trivit`` sub-command table."""
    p = sub.add_parser(
        "bench", help="benchmark trivit against HF transformers (and timm) in every installed framework",
        description="Benchmark trivit against its peers in the same run: GEMM roofline, inference, a train step, "
                    "from_pretrained time and peak RSS, image processors. Rows: median [min-max] over interleaved "
                    "rounds; ratio = trivit / peer. See docs/benchmarks.md.")
    p.add_argument("--frameworks", type=_names(FRAMEWORKS, "framework", _ALIASES), default=list(FRAMEWORKS),
                   metavar="pt,tf,flax", help="which frameworks (default all three; absent ones say 'not installed')")
    p.add_argument("--only", type=_names(SECTIONS, "section"), default=list(SECTIONS), metavar="SECTION,...",
                   help=f"run only these sections, from {', '.join(SECTIONS)} (default all)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true",
                      help="ViT-S/16 only, fewer rounds, a subset (what is left out is said in the table); "
                           "a few minutes on a 2-core CPU")
    size.add_argument("--tiny", action="store_true", help="tiny configs (seconds): for tests and CI, not for numbers")
    p.add_argument("--rounds", type=_positive, help="timed rounds per measurement (default 7; --quick 3; --tiny 2)")
    p.add_argument("--warmup", type=_positive, help="untimed calls per side first (default 2; --quick, --tiny 1)")
    p.add_argument("--threads", type=_positive, help="intra-op threads of PyTorch and TF, both sides alike "
                   "(default: theirs, all cores; --tiny 1); JAX keeps XLA's")
    p.add_argument("--json", type=Path, metavar="PATH", help="write every raw number, the machine and the command here")
    p.add_argument("--png", type=Path, metavar="PATH", help="write a bar chart of the ratios here (needs matplotlib)")
    p.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run the benchmark; the table on stdout, progress on stderr; exit 2 on usage errors."""
    if args.png is not None and importlib.util.find_spec("matplotlib") is None:
        print("trivit bench: error: --png needs matplotlib, which is not installed "
              "(pip install matplotlib, or pip install 'trivit[app]'); nothing was run", file=sys.stderr)
        return 2
    for opt, path in (("--json", args.json), ("--png", args.png)):
        if path is not None and not path.resolve().parent.is_dir():
            print(f"trivit bench: error: {opt} {path}: folder {path.resolve().parent} does not exist", file=sys.stderr)
            return 2
    quiet_frameworks()
    plan = make_plan("tiny" if args.tiny else "quick" if args.quick else "full", args.rounds, args.warmup,
                     args.threads)
    doc = bench(args.only, args.frameworks, plan, verbose=not args.quiet)
    order = ("skipped", *SECTIONS)
    rows: list[Row] = sorted(doc.pop("_rows"), key=lambda r: order.index(r.section))
    doc["options"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "func"}
    m = doc["machine"]
    print(table(rows, doc["roofline"]["flops"]))
    print(f"\n{plan.mode}: median [min-max] of {plan.rounds} interleaved rounds after {plan.warmup} warm-up; "
          f"ratio = trivit / peer; roofline = trivit's FLOP/s over the best GEMM of this run in that dtype"
          + ("" if doc["roofline"]["flops"] else " (not measured: add roofline to --only)")
          + f". {m['cpu']}, {m['usable_cores']} cores, {doc['seconds']:.0f} s.")
    if args.json is not None:
        args.json.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    if args.png is not None:
        write_png(rows, args.png, f"trivit / peer, {plan.mode} run on {m['cpu']} ({m['usable_cores']} cores)")
    return 0
