"""Preprocessing inside the graph (profile ``input``): the fold into the patch embedding, its parity on real
images, and every consumer of such an export (Triton, DeepStream, Predictor, the device kit's runner)."""

from __future__ import annotations

import configparser
import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from edgevit import Predictor
from edgevit.cli import main
from edgevit.data import split_arrays
from edgevit.errors import EdgeVitError
from edgevit.export import deepstream, export_bundle, preprocess
from edgevit.export import onnx as onnx_export
from edgevit.export.checks import run_onnx
from edgevit.export.profiles import InputSpec, load_profile, parse_profile
from edgevit.vit import load_bundle, read_meta, save_bundle

REPO = Path(__file__).resolve().parents[1]
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
UINT8_NHWC = {"pixels": "uint8", "range": "byte", "layout": "NHWC", "normalize": "in_graph"}


def with_input(name: str, **fields) -> object:
    profile = load_profile(name)
    return profile.model_copy(update={"input": InputSpec(**fields)})


def torch_logits(bundle: Path, normalised: np.ndarray) -> np.ndarray:
    model = load_bundle(bundle)[0].eval()
    with torch.inference_mode():
        return model(torch.from_numpy(normalised)).numpy()


def normalised_from(raw: np.ndarray, pre, layout: str, scale: float = 255.0) -> np.ndarray:
    """The bundle's normalisation applied to raw pixels, in float64 (the reference of every comparison)."""
    x = raw.astype(np.float64) / scale
    if layout == "NHWC":
        x = x.transpose(0, 3, 1, 2)
    shape = (1, -1, 1, 1)
    return ((x - np.reshape(pre.mean, shape)) / np.reshape(pre.std, shape)).astype(np.float32)


def test_input_section_defaults_are_todays_graph_and_typos_name_the_closest_key():
    base = {"name": "p", "target": "cpu", "runtime": "onnxruntime", "precision": "fp32"}
    assert parse_profile(base).input == InputSpec(pixels="float", range="unit", layout="NCHW", normalize="outside")
    with pytest.raises(EdgeVitError, match="unknown key 'input.normalise'; did you mean 'normalize'"):
        parse_profile({**base, "input": {"normalise": "in_graph"}})
    with pytest.raises(EdgeVitError, match="need normalize: in_graph"):
        parse_profile({**base, "input": {"pixels": "uint8", "range": "byte"}})
    with pytest.raises(EdgeVitError, match="uint8 pixels are in range: byte"):
        parse_profile({**base, "input": {"pixels": "uint8", "normalize": "in_graph"}})
    shipped = load_profile("jetson-orin-nano-fp16-raw").input
    assert shipped.raw and (shipped.pixels, shipped.range) == ("float", "byte")


@pytest.fixture(scope="module")
def digits_graph(digits_bundle, tmp_path_factory):
    """The digits baseline's plain graph (normalised float NCHW input), as the export writes it."""
    folder = tmp_path_factory.mktemp("fold")
    model, meta = load_bundle(digits_bundle)
    images, _ = split_arrays(meta, "test")
    batch = load_profile("cpu-ort-fp32").batch_spec
    onnx_export.export_onnx(model, folder / "raw.onnx", torch.from_numpy(images[:1]), batch)
    onnx_export.simplify(folder / "raw.onnx", folder / "model.onnx")
    return folder / "model.onnx", meta, images


@pytest.mark.parametrize(
    ("fields", "added"),
    [
        ({"range": "unit", "normalize": "in_graph"}, []),
        ({"pixels": "float", "range": "byte", "normalize": "in_graph"}, []),
        ({"pixels": "uint8", "range": "byte", "normalize": "in_graph"}, ["Cast"]),
        (UINT8_NHWC, ["Transpose", "Cast"]),
    ],
)
def test_fold_adds_no_node_besides_cast_and_transpose_and_keeps_the_logits(digits_graph, tmp_path, fields, added):
    path, meta, images = digits_graph
    spec = InputSpec(**fields)
    adapted = tmp_path / "model.onnx"
    shutil.copy(path, adapted)
    info = preprocess.adapt_input(adapted, "input", meta.preprocessing.mean, meta.preprocessing.std, spec)
    before = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    after = Counter(n.op_type for n in onnx.load(str(adapted)).graph.node)
    assert after - before == Counter(added) and before - after == Counter() and info["added_ops"] == added

    pre = {**meta.preprocessing.model_dump(), **spec.model_dump()}
    raw = preprocess.graph_pixels(images, pre)
    assert raw.dtype == (np.uint8 if spec.pixels == "uint8" else np.float32)
    reference = run_onnx(path, normalised_from(raw, meta.preprocessing, spec.layout, preprocess.RANGE[spec.range]), 64)
    np.testing.assert_allclose(run_onnx(adapted, raw, 64), reference, atol=1e-4, rtol=0)


def test_fold_refuses_a_graph_whose_input_feeds_more_than_the_patch_embedding(tmp_path):
    x = onnx.helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [1, 1, 4, 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 1, 4, 4])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["input"], ["y"])], "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph), str(tmp_path / "m.onnx"))
    with pytest.raises(EdgeVitError, match="feed only the patch-embedding Conv; it feeds Relu"):
        preprocess.adapt_input(tmp_path / "m.onnx", "input", [0.5], [0.5], InputSpec(normalize="in_graph"))


@pytest.fixture(scope="module")
def uint8_export(digits_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("raw") / "uint8-nhwc"
    return out, export_bundle(digits_bundle, with_input("cpu-ort-fp32", **UINT8_NHWC), out)


def test_uint8_export_matches_torch_on_the_digits_test_split_and_records_its_input(uint8_export, digits_bundle):
    out, export = uint8_export
    assert export["parity"]["passed"] and export["parity"]["max_abs_diff"] <= 1e-4
    assert export["input"]["dtype"] == "uint8" and export["input"]["shape"] == [-1, 16, 16, 1]
    assert export["input"]["preprocessing"]["normalize"] == "in_graph"
    assert export["graph"]["input"]["added_ops"] == ["Transpose", "Cast"]
    meta = read_meta(digits_bundle)
    images, _ = split_arrays(meta, "test")
    raw = preprocess.graph_pixels(images, export["input"]["preprocessing"])
    reference = torch_logits(digits_bundle, normalised_from(raw, meta.preprocessing, "NHWC"))
    assert np.abs(run_onnx(out / "model.onnx", raw, 64) - reference).max() <= 1e-4
    config = (out / "triton" / export["targets"]["triton"]["model"] / "config.pbtxt").read_text()
    assert "data_type: TYPE_UINT8\n    dims: [ 16, 16, 1 ]" in config


def test_predictor_and_the_device_runner_feed_raw_pixels(uint8_export, digits_bundle, tmp_path):
    out, export = uint8_export
    meta = read_meta(digits_bundle)
    images, _ = split_arrays(meta, "test", limit=32)
    pre = export["input"]["preprocessing"]
    # 8-bit images (what a camera or a PNG gives): the uint8 graph sees exactly their pixels
    images = normalised_from(preprocess.graph_pixels(images, pre), meta.preprocessing, "NHWC")
    via_ort = Predictor(out, backend="ort").logits(images)
    via_torch = Predictor(out, backend="torch").logits(images)
    np.testing.assert_allclose(via_ort, via_torch, atol=1e-4, rtol=0)

    pixels = preprocess.graph_pixels(images[:1], pre)[0]  # 16 x 16 x 1 uint8
    Image.fromarray(pixels[..., 0], "L").save(tmp_path / "digit.png")
    sys.path.insert(0, str(REPO / "jetson"))
    try:
        from run_folder import preprocess as device_preprocess
    finally:
        sys.path.remove(str(REPO / "jetson"))
    on_device = device_preprocess(tmp_path / "digit.png", pre)
    assert on_device.dtype == np.uint8 and np.array_equal(on_device, pixels)


def test_profile_measures_a_uint8_export_and_predictor_gives_its_top1(uint8_export, digits_bundle, tmp_path):
    out, _ = uint8_export
    results = tmp_path / "results.jsonl"
    args = ["profile", str(out), "--backend", "ort", "--batch", "1", "--iterations", "2", "--warmup", "0", "-o"]
    run = CliRunner().invoke(main, [*args, str(results)])
    assert run.exit_code == 0, run.output
    (row,) = [json.loads(line) for line in results.read_text().splitlines()]
    images, labels = split_arrays(read_meta(digits_bundle), "test")
    assert row["top1"] == pytest.approx(np.mean(Predictor(out).logits(images).argmax(1) == labels), abs=1e-5)


def test_deepstream_is_exact_with_in_graph_normalisation(digits_bundle, tmp_path):
    out = tmp_path / "orin-raw"
    export = export_bundle(digits_bundle, "jetson-orin-nano-fp16-raw", out)
    info = export["targets"]["deepstream"]
    assert info["exact"] and "warning" not in info
    parser = configparser.ConfigParser()
    parser.read(out / "deepstream" / "config_infer.txt")
    props = parser["property"]
    assert float(props["net-scale-factor"]) == 1.0 and [float(o) for o in props["offsets"].split(";")] == [0.0]
    # nvinfer computes net-scale-factor * (x - offsets) on 0..255 pixels: that is the graph's input as it is
    meta = read_meta(digits_bundle)
    images, _ = split_arrays(meta, "val", limit=64)
    pixels = np.rint(preprocess.graph_pixels(images, export["input"]["preprocessing"]))  # 8-bit frames
    nvinfer_input = (float(props["net-scale-factor"]) * (pixels - 0.0)).astype(np.float32)
    reference = torch_logits(digits_bundle, normalised_from(pixels, meta.preprocessing, "NCHW"))
    assert np.abs(run_onnx(out / "model.onnx", nvinfer_input, 1) - reference).max() <= 1e-4
    assert "TYPE_FP32" in next((out / "triton").glob("*/config.pbtxt")).read_text()


def test_deepstream_scale_for_unit_range_and_no_config_for_uint8_graphs(tmp_path):
    pre = {"size": 16, "channels": 3, **IMAGENET, "normalize": "in_graph", "range": "unit"}
    assert deepstream.scale_and_offsets(pre) == (1 / 255, [0.0, 0.0, 0.0], True)
    profile = with_input("jetson-orin-nano-fp16", pixels="uint8", range="byte", normalize="in_graph")
    export = {"input": {"preprocessing": {**pre, **profile.input.model_dump()}}}
    info = deepstream.emit(tmp_path, export, profile, np.zeros((0,)))
    assert "float NCHW" in info["skipped"] and not (tmp_path / "deepstream").exists()


def test_224px_rgb_vit_with_uint8_input_matches_torch(image_folder, tmp_path):
    """vit_tiny_patch16_224 (random weights, ImageNet's per-channel mean/std) on the folder's real images."""
    from edgevit.data import data_ref
    from edgevit.vit import BundleMeta
    from edgevit.vit.bundle import BaseArch, Preprocessing, build_model

    torch.manual_seed(0)
    meta = BundleMeta(
        base=BaseArch(name="vit_tiny_patch16_224", kwargs={"img_size": 224, "in_chans": 3, "num_classes": 3}),
        preprocessing=Preprocessing(size=224, channels=3, **IMAGENET),
        classes=["bolt", "nut", "washer"],
        data=data_ref(str(image_folder)),
        provenance={"method": "test"},
    )
    save_bundle(tmp_path / "bundle", build_model(meta), meta)
    profile = with_input("cpu-ort-fp32", pixels="uint8", range="byte", normalize="in_graph")
    profile = profile.model_copy(update={"ort_fusions": "none"})
    export = export_bundle(tmp_path / "bundle", profile, tmp_path / "out")
    assert export["parity"]["passed"] and export["parity"]["max_abs_diff"] <= 1e-4
    images, _ = split_arrays(meta, "val")
    raw = preprocess.graph_pixels(images, export["input"]["preprocessing"])
    reference = torch_logits(tmp_path / "bundle", normalised_from(raw, meta.preprocessing, "NCHW"))
    assert np.abs(run_onnx(tmp_path / "out" / "model.onnx", raw, 8) - reference).max() <= 1e-4
