"""Conversion of ViT Hybrid (ResNet / BiT backbone + ViT) checkpoints: HF folders, timm, vision_transformer .npz.

timm and the JAX code bases are not installed. Files are built from random arrays with each code base's
documented names and layouts; converted models are compared with reference forwards written here from the
documented architectures: the ResNetV2 bottleneck backbone in float64 numpy (TF-SAME padding everywhere, a
-inf padded SAME max-pool, each code base's own weight standardisation formula and GroupNorm eps), then the
timm / flax ViT references of ``test_conversion.py`` applied to the feature map (its module constants that
describe the pixel grid are pointed at the feature map for the call).
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
import safetensors.torch
import torch

import test_conversion as vit_ref
from conftest import FRAMEWORKS
from conversion import UnsupportedFeatureError, convert_to, read_npz, read_source, read_timm
from conversion.detect import detect_format, read_hf
from frameworks import ADAPTERS
from settings import ATOL
from test_conversion import DEPTH, HEADS, D, _fw_out, _record, jax_params, jax_reference, timm_reference, timm_state
from conversion.loading import read_checkpoint
from trivit.cli import main
from vit_core.config_hybrid import ViTHybridConfig
from vit_core.safetensors_io import CheckpointError

C, STEM = 3, 32
#: depths → (image size, feature-map side): stride 4 · 2^(stages-1), so both give a 4×4 map.
BACKBONES = {(2, 1): (32, 4), (1, 1, 1): (64, 4)}
CLS, MODEL = "ViTHybridForImageClassification", "ViTHybridModel"
#: Each code base's documented numerics: (standardise a (kh, kw, in, out) kernel per output channel, GroupNorm eps).
TIMM_NUMERICS = (lambda k: (k - k.mean((0, 1, 2))) / np.sqrt(k.var((0, 1, 2)) + 1e-8), 1e-5)  # StdConv2dSame(eps=1e-8)
JAX_NUMERICS = (lambda k: (k - k.mean((0, 1, 2))) / (k.std((0, 1, 2)) + 1e-5), 1e-6)  # StdConv; flax GroupNorm


def pixels_for(size: int) -> np.ndarray:
    """Two images: unit scale, and 1e-3 scale (the stem GroupNorm's variance is then ~1e-4, where its eps shows)."""
    x = np.random.default_rng(1).standard_normal((2, C, size, size)).astype(np.float32)
    x[1] *= 1e-3
    return x


# ------------------------------------------------------------------------ the ResNet, neutrally
def resnet_params(depths, seed: int = 0, stem: int = STEM, width: int = 128) -> dict[str, np.ndarray]:
    """vision_transformer's ResNet parameters (flax names, (kh, kw, in, out) kernels): the neutral form both
    file writers start from. Each kernel's output channels have stds spread over 1e-4..1e-2, where both
    standardisation eps values matter and a GroupNorm over several channels does not cancel them."""
    rng = np.random.default_rng(seed)
    def r(*shape: int, scale: float | None = None) -> np.ndarray:
        std = 10 ** rng.uniform(-4, -2, shape[-1]) if scale is None else scale
        return (rng.standard_normal(shape) * std).astype(np.float32)

    def gn(name: str, n: int) -> dict[str, np.ndarray]:
        return {f"{name}/scale": 0.5 + r(n, scale=0.1), f"{name}/bias": r(n, scale=0.1)}

    out = {"conv_root/kernel": r(7, 7, C, stem), **gn("gn_root", stem)}
    cin = stem
    for s, depth in enumerate(depths, 1):
        cout = width * 2 ** (s - 1)
        mid = cout // 4
        for u in range(1, depth + 1):
            b = f"block{s}/unit{u}/"
            out |= {b + "conv1/kernel": r(1, 1, cin, mid), **gn(b + "gn1", mid), b + "conv2/kernel": r(3, 3, mid, mid),
                    **gn(b + "gn2", mid), b + "conv3/kernel": r(1, 1, mid, cout), **gn(b + "gn3", cout)}
            if u == 1:
                out |= {b + "conv_proj/kernel": r(1, 1, cin, cout), **gn(b + "gn_proj", cout)}
            cin = cout
    return out


def _conv_same(x: np.ndarray, k: np.ndarray, stride: int) -> np.ndarray:
    """TF-SAME convolution, NHWC × (kh, kw, in, out): out = ceil(n / s), the odd pad pixel after."""
    kh, kw = k.shape[:2]
    pads = []
    for n, kk in zip(x.shape[1:3], (kh, kw)):
        total = max((math.ceil(n / stride) - 1) * stride + kk - n, 0)
        pads.append((total // 2, total - total // 2))
    x = np.pad(x, [(0, 0), *pads, (0, 0)])
    oh, ow = (x.shape[1] - kh) // stride + 1, (x.shape[2] - kw) // stride + 1
    return sum(x[:, a:a + stride * oh:stride, c:c + stride * ow:stride] @ k[a, c] for a in range(kh) for c in range(kw))


def _max_pool_same(x: np.ndarray) -> np.ndarray:
    """3×3 stride-2 SAME max-pool padded with -inf (flax ``nn.max_pool``, timm ``MaxPool2dSame``)."""
    n = x.shape[1]
    total = max((math.ceil(n / 2) - 1) * 2 + 3 - n, 0)
    pad = (total // 2, total - total // 2)
    x = np.pad(x, [(0, 0), pad, pad, (0, 0)], constant_values=-np.inf)
    o = (x.shape[1] - 3) // 2 + 1
    return np.max([x[:, a:a + 2 * o:2, c:c + 2 * o:2] for a in range(3) for c in range(3)], axis=0)


def resnet_reference(w: dict[str, np.ndarray], x_nchw: np.ndarray, numerics, groups: int = 32) -> np.ndarray:
    """The non-pre-activation ResNetV2 of both code bases (float64): root conv 7×7/2, GN+ReLU, max-pool;
    units y = GN(conv3(ReLU(GN(conv2(ReLU(GN(conv1 x))))))), out = ReLU(y + proj(x)); stride 2 in the
    3×3 conv and the projection of the first unit of every stage but the first. Returns NCHW."""
    standardize, eps = numerics
    w = {k: v.astype(np.float64) for k, v in w.items()}

    def conv(t, name, stride=1):
        return _conv_same(t, standardize(w[f"{name}/kernel"]), stride)

    def gn(t, name, relu=True):
        b, h, wd, c = t.shape
        g = t.reshape(b, h, wd, groups, c // groups)
        mu, var = g.mean((1, 2, 4), keepdims=True), g.var((1, 2, 4), keepdims=True)
        t = ((g - mu) / np.sqrt(var + eps)).reshape(t.shape) * w[f"{name}/scale"] + w[f"{name}/bias"]
        return np.maximum(t, 0) if relu else t

    x = _max_pool_same(gn(conv(x_nchw.astype(np.float64).transpose(0, 2, 3, 1), "conv_root", 2), "gn_root"))
    s = 1
    while f"block{s}/unit1/conv1/kernel" in w:
        u = 1
        while f"block{s}/unit{u}/conv1/kernel" in w:
            p, stride = f"block{s}/unit{u}/", 2 if s > 1 and u == 1 else 1
            res = gn(conv(x, p + "conv_proj", stride), p + "gn_proj", relu=False) if u == 1 else x
            y = gn(conv(gn(conv(x, p + "conv1"), p + "gn1"), p + "conv2", stride), p + "gn2")
            x = np.maximum(gn(conv(y, p + "conv3"), p + "gn3", relu=False) + res, 0)
            u += 1
        s += 1
    return x.transpose(0, 3, 1, 2)


def vit_on_features(monkeypatch, feats: np.ndarray, patch: int, reference, *args):
    """``test_conversion``'s ViT reference over a (B, C', n, n) feature map: its pixel-grid constants
    (image side, patch, channels) are pointed at the map for the call."""
    with monkeypatch.context() as m:
        m.setattr(vit_ref, "IMG", feats.shape[-1])
        m.setattr(vit_ref, "P", patch)
        m.setattr(vit_ref, "C", feats.shape[1])
        return reference(*args)


# ------------------------------------------------------------------------------------- timm
def _timm_name(key: str) -> str:
    """vision_transformer ResNet name → timm ResNetV2 name (under ``patch_embed.backbone.``)."""
    scope, leaf = key.rsplit("/", 1)
    leaf = "weight" if leaf in ("kernel", "scale") else "bias"
    if scope in ("conv_root", "gn_root"):
        return f"patch_embed.backbone.stem.{'conv' if scope == 'conv_root' else 'norm'}.{leaf}"
    block, unit, module = scope.split("/")
    module = {"conv_proj": "downsample.conv", "gn_proj": "downsample.norm"}.get(module, module.replace("gn", "norm"))
    return f"patch_embed.backbone.stages.{int(block[5:]) - 1}.blocks.{int(unit[4:]) - 1}.{module}.{leaf}"


def feature_channels(resnet: dict[str, np.ndarray]) -> int:
    """Output channels of the last stage (its first unit's ``conv3``)."""
    return resnet[max(k for k in resnet if k.endswith("/unit1/conv3/kernel"))].shape[-1]


def timm_hybrid_state(resnet: dict[str, np.ndarray], patch: int, tokens: int, classes: int = 5) -> dict:
    """A timm hybrid state dict: the backbone in (out, in, kh, kw), ``patch_embed.proj`` over the last
    map, and ``test_conversion``'s timm ViT for the rest."""
    sd = timm_state(seed=2, classes=classes)
    g = torch.Generator().manual_seed(3)
    sd["patch_embed.proj.weight"] = torch.randn(D, feature_channels(resnet), patch, patch, generator=g) * 0.02
    sd["pos_embed"] = torch.randn(1, tokens + 1, D, generator=g) * 0.2
    for k, v in resnet.items():
        sd[_timm_name(k)] = torch.from_numpy(v.transpose(3, 2, 0, 1).copy() if v.ndim == 4 else v.copy())
    return sd


def timm_hybrid_reference(monkeypatch, resnet, sd, pixels, patch, numerics=TIMM_NUMERICS) -> np.ndarray:
    feats = resnet_reference(resnet, pixels, numerics)
    sd64 = {k: v.double() for k, v in sd.items()}
    with torch.no_grad():
        out = vit_on_features(monkeypatch, feats, patch, timm_reference, sd64, torch.from_numpy(feats), HEADS)
    return out.numpy()


def _write_timm(tmp_path, depths, patch, classes=5, suffix=".safetensors"):
    resnet = resnet_params(depths)
    side = BACKBONES[depths][1]
    sd = timm_hybrid_state(resnet, patch, (side // patch) ** 2, classes)
    src = tmp_path / f"vit_r{suffix}"
    (torch.save(sd, src) if suffix == ".pth" else safetensors.torch.save_file(sd, src))
    return src, resnet, sd


@pytest.mark.parametrize("depths, patch, classes, suffix", [((2, 1), 1, 5, ".safetensors"), ((2, 1), 2, 0, ".pth"),
                                                            ((1, 1, 1), 1, 5, ".pth")])
def test_timm_hybrid_matches_reference(tmp_path, monkeypatch, depths, patch, classes, suffix):
    src, resnet, sd = _write_timm(tmp_path, depths, patch, classes, suffix)
    image = BACKBONES[depths][0]
    assert detect_format(src) == "timm"
    conv = read_timm(src, num_heads=HEADS)
    c = conv.config
    assert isinstance(c, ViTHybridConfig) and conv.model_class == (CLS if classes else MODEL)
    assert (c.image_size, c.patch_size, c.num_channels, c.hidden_act, c.layer_norm_eps) == (image, patch, C, "gelu", 1e-6)
    b = c.bit
    assert (b.depths, b.hidden_sizes, b.embedding_size, b.layer_type, b.global_padding) == (
        list(depths), [128 * 2**i for i in range(len(depths))], STEM, "bottleneck", "SAME")
    assert b.embedding_dynamic_padding and b.out_features == [f"stage{len(depths)}"] and b.num_groups == 32
    assert (b.weight_standardization, b.weight_standardization_eps, b.group_norm_eps) == ("var_eps", 1e-8, 1e-5)
    convert_to(conv, tmp_path / "hf")
    pixels = pixels_for(image)
    want = timm_hybrid_reference(monkeypatch, resnet, sd, pixels, patch)
    field = "logits" if classes else "last_hidden_state"
    flags = {} if classes else {"add_pooling_layer": False}
    got = _fw_out("pt", tmp_path / "hf", conv.model_class, pixels, field, **flags)
    assert _record("timm hybrid vs reference", got, want) <= ATOL


def test_timm_hybrid_folder_loads_in_hf(tmp_path, monkeypatch):
    """The converted timm folder is an HF ``ViTHybridForImageClassification`` checkpoint: HF's own model
    (the oracle of the HF numerics) gives the reference's logits."""
    src, resnet, sd = _write_timm(tmp_path, (2, 1), 1)
    convert_to(read_timm(src, num_heads=HEADS), tmp_path / "hf")
    pixels = pixels_for(32)
    got = _fw_out("hf", tmp_path / "hf", CLS, pixels, "logits")
    want = timm_hybrid_reference(monkeypatch, resnet, sd, pixels, 1)
    assert _record("timm hybrid folder in HF vs reference", got, want) <= ATOL


def _drop(prefix):
    return lambda sd: [sd.pop(k) for k in [k for k in sd if k.startswith(prefix)]]


@pytest.mark.parametrize("change, feature", [
    (lambda sd: sd.update({"patch_embed.backbone.conv1.0.weight": torch.zeros(8, 3, 3, 3)}), "non-BiT CNN backbone"),
    (lambda sd: sd.update({"patch_embed.backbone.layer1.0.conv1.weight": torch.zeros(8, 8, 1, 1)}), "non-BiT CNN backbone"),
    (lambda sd: [sd.update({k.replace("stem.", ""): sd.pop(k)}) for k in [k for k in sd if ".stem." in k]]
     + _drop("patch_embed.backbone.stages.")(sd), "stem-only"),
    (lambda sd: sd.update({"patch_embed.backbone.stem.conv1.weight": torch.zeros(8, 3, 3, 3)}), "deep ResNetV2 stem"),
    (lambda sd: sd.update({"patch_embed.backbone.norm.weight": torch.ones(256)}), "pre-activation"),
    (_drop("patch_embed.backbone.stem.norm."), "pre-activation"),
    (lambda sd: sd.update({"patch_embed.backbone.stages.0.blocks.1.downsample.conv.weight": torch.zeros(128, 128, 1, 1)}),
     "backbone keys HF's BiT has no place for"),
    (_drop("patch_embed.backbone.stages."), "stem-only"),
])
def test_timm_hybrid_refusals_name_the_feature(tmp_path, change, feature):
    sd = timm_hybrid_state(resnet_params((2, 1)), 1, 16)
    change(sd)
    torch.save(sd, tmp_path / "v.pth")
    with pytest.raises(UnsupportedFeatureError, match=feature):
        read_timm(tmp_path / "v.pth", num_heads=HEADS)
    assert main(["convert", str(tmp_path / "v.pth"), str(tmp_path / "out"), "--num-heads", str(HEADS)]) == 2
    assert not (tmp_path / "out").exists()


def test_timm_hybrid_bad_bottleneck_and_missing_projection(tmp_path):
    sd = timm_hybrid_state(resnet_params((2, 1)), 1, 16)
    unit = "patch_embed.backbone.stages.1.blocks.0."
    for k, cut in (("conv1", np.s_[:48]), ("conv2", np.s_[:48, :48]), ("conv3", np.s_[:, :48])):
        sd[f"{unit}{k}.weight"] = sd[f"{unit}{k}.weight"][cut]  # a 48-channel bottleneck (HF's BiT: out / 4 = 64)
    torch.save(sd, tmp_path / "a.pth")
    with pytest.raises(UnsupportedFeatureError, match="bottleneck of 48 channels"):
        read_timm(tmp_path / "a.pth", num_heads=HEADS)
    sd = timm_hybrid_state(resnet_params((2, 1)), 1, 16)
    del sd["patch_embed.backbone.stages.1.blocks.0.downsample.conv.weight"]
    torch.save(sd, tmp_path / "b.pth")
    with pytest.raises(CheckpointError, match="stages.1.blocks.0.downsample.conv.weight"):
        read_timm(tmp_path / "b.pth", num_heads=HEADS)


# -------------------------------------------------------------------------------------- npz
def npz_hybrid_params(resnet, patch: int, tokens: int, classes: int = 5, pre_logits: int = 0) -> dict[str, np.ndarray]:
    """vision_transformer R+ViT: the ResNet, ``embedding`` (p, p, C', D) over its last map, the usual ViT."""
    params = {**jax_params(4, big_vision=False, classes=classes, pre_logits=pre_logits), **resnet}
    rng = np.random.default_rng(5)
    r = lambda *s, scale: (rng.standard_normal(s) * scale).astype(np.float32)  # noqa: E731
    params["embedding/kernel"] = r(patch, patch, feature_channels(resnet), D, scale=0.02)
    params["Transformer/posembed_input/pos_embedding"] = r(1, tokens + 1, D, scale=0.2)
    return params


def npz_hybrid_reference(monkeypatch, params, pixels, patch, numerics=JAX_NUMERICS, groups=32):
    resnet = {k: v for k, v in params.items() if k.startswith(("conv_root/", "gn_root/", "block"))}
    feats = resnet_reference(resnet, pixels, numerics, groups)
    return vit_on_features(monkeypatch, feats, patch, jax_reference, params, feats, False)


@pytest.mark.parametrize("depths, patch", [((2, 1), 1), ((1, 1, 1), 2)])
def test_npz_hybrid_matches_reference(tmp_path, monkeypatch, depths, patch):
    image, side = BACKBONES[depths]
    params = npz_hybrid_params(resnet_params(depths), patch, (side // patch) ** 2)
    np.savez(tmp_path / "R50+ViT.npz", **params)
    fmt, conv = read_source(tmp_path / "R50+ViT.npz")
    c, b = conv.config, conv.config.bit
    assert fmt == "npz" and conv.model_class == CLS
    assert (c.image_size, c.patch_size, c.num_channels, c.hidden_act) == (image, patch, C, "gelu_new")
    assert (b.weight_standardization, b.weight_standardization_eps, b.group_norm_eps) == ("std_eps", 1e-5, 1e-6)
    assert b.depths == list(depths) and b.global_padding == "SAME" and b.embedding_dynamic_padding
    convert_to(conv, tmp_path / "hf")
    pixels = pixels_for(image)
    got = _fw_out("pt", tmp_path / "hf", CLS, pixels, "logits")
    assert _record("npz hybrid vs reference", got, npz_hybrid_reference(monkeypatch, params, pixels, patch)) <= ATOL


def test_npz_hybrid_pre_logits_becomes_pooler(tmp_path, monkeypatch):
    params = npz_hybrid_params(resnet_params((2, 1)), 1, 16, classes=0, pre_logits=24)
    np.savez(tmp_path / "r.npz", **params)
    conv = read_npz(tmp_path / "r.npz")
    assert conv.model_class == MODEL and conv.flags == {"add_pooling_layer": True}
    convert_to(conv, tmp_path / "hf")
    pixels = pixels_for(32)
    adapter = ADAPTERS["pt"]()
    out = adapter.run(adapter.load(MODEL, tmp_path / "hf"), {"pixel_values": pixels})
    hidden, pooled = npz_hybrid_reference(monkeypatch, params, pixels, 1)
    assert _record("npz hybrid vs reference", out["last_hidden_state"], hidden) <= ATOL
    assert _record("npz hybrid vs reference", out["pooler_output"], pooled) <= ATOL


def test_numerics_knobs_matter(monkeypatch):
    """The references can fail: with the other code base's standardisation / GroupNorm eps the same weights
    give logits far outside the tolerance (so matching each source is evidence of its own numerics)."""
    params = npz_hybrid_params(resnet_params((2, 1)), 1, 16)
    pixels = pixels_for(32)
    right = npz_hybrid_reference(monkeypatch, params, pixels, 1)
    for wrong in (TIMM_NUMERICS, (JAX_NUMERICS[0], 1e-5), (TIMM_NUMERICS[0], 1e-6)):
        diff = np.abs(npz_hybrid_reference(monkeypatch, params, pixels, 1, wrong) - right).max()
        print(f"wrong numerics: max |logits difference| {diff:.3g}")
        assert diff > 100 * ATOL


@pytest.mark.parametrize("change, error, match", [
    (lambda p: [p.pop(k) for k in [k for k in p if k.startswith("block")]], UnsupportedFeatureError, "stem-only"),
    (lambda p: p.update({"block1/unit2/conv_proj/kernel": np.zeros((1, 1, 128, 128), np.float32)}),
     UnsupportedFeatureError, "backbone keys HF's BiT has no place for"),
    (lambda p: p.pop("block2/unit1/gn_proj/scale"), CheckpointError, "block2/unit1/gn_proj/scale"),
    (lambda p: p.update({"pre_logits/kernel": np.zeros((D, 8), np.float32), "pre_logits/bias": np.zeros(8, np.float32)}),
     UnsupportedFeatureError, "pre_logits"),
])
def test_npz_hybrid_refusals(tmp_path, change, error, match):
    params = npz_hybrid_params(resnet_params((2, 1)), 1, 16)
    change(params)
    np.savez(tmp_path / "r.npz", **params)
    with pytest.raises(error, match=match):
        read_npz(tmp_path / "r.npz")


def test_npz_hybrid_as_big_vision_refused(tmp_path):
    np.savez(tmp_path / "r.npz", **npz_hybrid_params(resnet_params((2, 1)), 1, 16))
    with pytest.raises(UnsupportedFeatureError, match="conv_root"):
        read_npz(tmp_path / "r.npz", flavour="big_vision")


def test_num_groups_not_in_the_file(tmp_path, monkeypatch):
    """Widths that 32 does not divide: refused until num_groups is given; with it, the reference's numbers."""
    resnet = resnet_params((2, 1), stem=16, width=64)
    params = npz_hybrid_params(resnet, 1, 16)
    np.savez(tmp_path / "r.npz", **params)
    with pytest.raises(CheckpointError, match="num_groups"):
        read_npz(tmp_path / "r.npz")
    conv = read_npz(tmp_path / "r.npz", num_groups=8)
    assert conv.config.bit.num_groups == 8
    convert_to(conv, tmp_path / "hf")
    pixels = pixels_for(32)
    got = _fw_out("pt", tmp_path / "hf", CLS, pixels, "logits")
    assert _record("npz hybrid vs reference", got, npz_hybrid_reference(monkeypatch, params, pixels, 1, groups=8)) <= ATOL
    assert main(["convert", str(tmp_path / "r.npz"), str(tmp_path / "cli"), "--num-groups", "8"]) == 0
    np.savez(tmp_path / "plain.npz", **jax_params(0, big_vision=False))
    with pytest.raises(CheckpointError, match="num_groups applies to hybrid"):
        read_npz(tmp_path / "plain.npz", num_groups=8)


# ------------------------------------------------------------------- every framework, the CLI
def _has_class(fw: str, cls: str) -> bool:
    module, prefix = {"pt": ("vit_torch", ""), "tf": ("vit_tf", "TF"), "flax": ("vit_flax", "Flax")}[fw]
    return hasattr(importlib.import_module(module), prefix + cls)


@pytest.mark.parametrize("fw", FRAMEWORKS)
@pytest.mark.parametrize("source", ["timm", "npz"])
def test_hybrid_from_pretrained_reads_single_foreign_files(tmp_path, monkeypatch, fw, source):
    """``<fw>.ViTHybridForImageClassification.from_pretrained(file)``: config derived, weights converted
    on load, the reference's logits."""
    if not _has_class(fw, CLS):
        pytest.skip(f"{fw} has no {CLS} yet")
    pixels = pixels_for(32)
    if source == "timm":
        src, resnet, sd = _write_timm(tmp_path, (2, 1), 1)
        want = timm_hybrid_reference(monkeypatch, resnet, sd, pixels, 1)
    else:
        params = npz_hybrid_params(resnet_params((2, 1)), 1, 16)
        src = tmp_path / "r.npz"
        np.savez(src, **params)
        want = npz_hybrid_reference(monkeypatch, params, pixels, 1)
    got = _fw_out(fw, src, CLS, pixels, "logits", num_heads=HEADS)
    assert _record(f"{source} hybrid file via {fw}.from_pretrained vs reference", got, want) <= ATOL


def test_cli_convert_verify_hybrid(tmp_path, capsys):
    src, _, _ = _write_timm(tmp_path, (2, 1), 1)
    rc = main(["convert", str(src), str(tmp_path / "hf"), "--num-heads", str(HEADS), "--verify", "--verify-in", "pt"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "as timm checkpoint: BiT bottleneck backbone (stem 32, depths [2, 1], widths [128, 256]" in out
    assert f"{DEPTH} layers, width {D}" in out and f"-> {CLS}" in out
    worst = float(out.rsplit("max abs difference", 1)[1].split()[0])
    assert _record("hybrid cli --verify (pt)", worst, 0.0) <= ATOL
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "h5"), "--to", "tf-h5"]) == 2
    assert "HF TensorFlow has no ViTHybridForImageClassification" in capsys.readouterr().err
    assert not (tmp_path / "h5").exists()


# --------------------------------------------------------------------------------- HF folders
def test_hf_hybrid_folder(tmp_path):
    """An HF (vit_torch-saved) hybrid folder reads as ViTHybrid* with a ViTHybridConfig; canonical → canonical
    is bit-exact; ``--num-labels 0`` keeps the backbone as ViTHybridModel."""
    import vit_torch

    torch.manual_seed(0)
    config = ViTHybridConfig(hidden_size=D, num_hidden_layers=DEPTH, num_attention_heads=HEADS, intermediate_size=48,
                             image_size=32, num_labels=3, backbone_config=dict(
                                 embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1], num_groups=4,
                                 layer_type="bottleneck", global_padding="SAME", embedding_dynamic_padding=True))
    vit_torch.ViTHybridForImageClassification(config).save_pretrained(tmp_path / "cls")
    fmt, conv = read_source(tmp_path / "cls")
    assert fmt == "hf" and conv.model_class == CLS and isinstance(conv.config, ViTHybridConfig)
    assert conv.config.bit.num_groups == 4 and conv.config.bit.depths == [1, 1]
    convert_to(conv, tmp_path / "copy")
    a, b = read_checkpoint(tmp_path / "cls"), read_checkpoint(tmp_path / "copy")
    assert set(a) == set(b) and all(a[k].tobytes() == b[k].tobytes() for k in a)
    base = read_hf(tmp_path / "cls", num_labels=0)
    assert base.model_class == MODEL and base.flags == {"add_pooling_layer": False}
    convert_to(base, tmp_path / "base")
    assert not any(k.startswith(("classifier.", "vit.")) for k in read_checkpoint(tmp_path / "base"))
