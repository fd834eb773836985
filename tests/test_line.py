"""From engine to the line: Triton repositories and DeepStream nvinfer configs written by every export."""

from __future__ import annotations

import configparser
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from edgevit.errors import EdgeVitError
from edgevit.export import deepstream, devicekit, export_bundle, list_profiles, triton
from edgevit.export.checks import run_onnx
from edgevit.resources import shipped_dir
from edgevit.vit import save_bundle

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient is a dev extra")
text_format = pytest.importorskip("google.protobuf.text_format")

# Every key of nvinfer's [property] group, transcribed from DeepStream's gstnvinfer_property_parser.h
# (CONFIG_GROUP_INFER_* macros; the Gst-nvinfer page of the DeepStream developer guide lists the same keys).
NVINFER_PROPERTY_KEYS = {
    "parse-func",
    "gie-unique-id",
    "process-mode",
    "interval",
    "labelfile-path",
    "gpu-id",
    "secondary-reinfer-interval",
    "output-tensor-meta",
    "enable-dla",
    "use-dla-core",
    "batch-size",
    "tensor-meta-pool-size",
    "network-mode",
    "model-engine-file",
    "int8-calib-file",
    "workspace-size",
    "output-blob-names",
    "is-classifier",
    "network-type",
    "force-implicit-batch-dim",
    "infer-dims",
    "output-io-formats",
    "layer-device-precision",
    "model-color-format",
    "net-scale-factor",
    "offsets",
    "mean-file",
    "maintain-aspect-ratio",
    "symmetric-padding",
    "scaling-filter",
    "scaling-compute-hw",
    "network-input-order",
    "input-tensor-from-meta",
    "custom-lib-path",
    "parse-bbox-func-name",
    "parse-bbox-instance-mask-func-name",
    "engine-create-func-name",
    "parse-classifier-func-name",
    "custom-network-config",
    "model-file",
    "proto-file",
    "uff-file",
    "uff-input-order",
    "input-dims",
    "uff-input-dims",
    "uff-input-blob-name",
    "tlt-encoded-model",
    "tlt-model-key",
    "onnx-file",
    "num-detected-classes",
    "enable-dbscan",
    "cluster-mode",
    "classifier-type",
    "classifier-threshold",
    "classifier-async-mode",
    "segmentation-threshold",
    "segmentation-output-order",
    "output-instance-mask",
    "input-object-min-width",
    "input-object-min-height",
    "input-object-max-width",
    "input-object-max-height",
    "operate-on-gie-id",
    "operate-on-class-ids",
    "filter-out-class-ids",
}
CLASSIFIER_KEYS = {
    "onnx-file",
    "model-engine-file",
    "labelfile-path",
    "batch-size",
    "network-mode",
    "network-type",
    "process-mode",
    "gie-unique-id",
    "net-scale-factor",
    "offsets",
    "model-color-format",
    "infer-dims",
    "output-blob-names",
    "classifier-threshold",
    "maintain-aspect-ratio",
    "scaling-filter",
}
PROFILES = [p for p, _ in list_profiles()]
IMAGENET = {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}


def parse_config(text: str):
    return text_format.Parse(text, model_config_pb2.ModelConfig())


def read_nvinfer(path: Path) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str  # nvinfer keys are case-sensitive
    parser.read_string(path.read_text())
    assert parser.sections() == ["property"]
    return dict(parser["property"])


def fake_export(profile, channels: int = 1, pre: dict | None = None) -> dict:
    """export.json as the pipeline writes it, for a 16 px model with 10 classes (no export run needed)."""
    batch = -1 if profile.batch_spec.dynamic else profile.batch_spec.max
    pre = {
        "size": 16,
        "channels": channels,
        "mean": [0.5] * channels,
        "std": [0.5] * channels,
        "interpolation": "bilinear",
        **(pre or {}),
    }
    return {
        "method": "baseline",
        "profile": profile.model_dump(mode="json"),
        "deploy_onnx": "model.int8.onnx" if profile.precision == "int8" else "model.onnx",
        "input": {"name": "input", "shape": [batch, channels, 16, 16], "dtype": "float32", "preprocessing": pre},
        "output": {"name": "logits", "shape": [batch, 10], "dtype": "float32", "classes": [str(i) for i in range(10)]},
    }


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: p.name)
def test_every_shipped_profile_writes_a_triton_config_that_parses_with_tritons_proto(profile):
    export = fake_export(profile)
    config = parse_config(triton.config_pbtxt(export, profile))
    platform = {"tensorrt": "tensorrt_plan", "onnxruntime": "onnxruntime_onnx"}[profile.runtime]
    assert config.name == triton.model_name(export) and config.platform == platform
    (inp,), (out,) = config.input, config.output
    assert (inp.name, out.name) == ("input", "logits") and out.label_filename == "labels.txt"
    assert inp.data_type == out.data_type == model_config_pb2.TYPE_FP32
    batch = profile.batch_spec
    if batch.dynamic:  # Triton owns the batch dimension
        assert config.max_batch_size == batch.max and list(inp.dims) == [1, 16, 16] and list(out.dims) == [10]
        assert list(config.dynamic_batching.preferred_batch_size) == sorted({batch.opt, batch.max})
    else:  # a fixed-shape graph: Triton's backends refuse max_batch_size > 0 for it
        assert config.max_batch_size == 0 and list(inp.dims) == [batch.max, 1, 16, 16]
        assert not config.HasField("dynamic_batching")
    kind = (
        model_config_pb2.ModelInstanceGroup.KIND_CPU
        if profile.target == "cpu"
        else model_config_pb2.ModelInstanceGroup.KIND_GPU
    )
    assert [(g.count, g.kind) for g in config.instance_group] == [(1, kind)]


@pytest.mark.parametrize("profile", [p for p in PROFILES if p.runtime == "tensorrt"], ids=lambda p: p.name)
def test_every_shipped_tensorrt_profile_writes_an_nvinfer_classifier_config_with_nvinfers_keys(profile, tmp_path):
    (tmp_path / "c.txt").write_text(deepstream.config_infer(fake_export(profile), profile))
    props = read_nvinfer(tmp_path / "c.txt")
    assert set(props) <= NVINFER_PROPERTY_KEYS, set(props) - NVINFER_PROPERTY_KEYS
    assert set(props) >= CLASSIFIER_KEYS
    assert props["network-type"] == "1" and props["process-mode"] == "1"
    assert props["network-mode"] == str({"fp32": 0, "int8": 1, "fp16": 2, "fp8": 2}[profile.precision])  # no FP8 mode
    assert props["batch-size"] == str(profile.batch_spec.max) and props["infer-dims"] == "1;16;16"
    assert props["model-color-format"] == "2" and props["output-blob-names"] == "logits"
    assert float(props["classifier-threshold"]) >= 0  # nvinfer refuses a negative one
    assert ("use-dla-core" in props) == (profile.tensorrt.dla_core is not None)


def test_nvinfer_scale_and_offsets_reproduce_the_models_normalisation():
    """nvinfer computes net-scale-factor * (x - offsets[c]) on 0..255 pixels; that must be (x/255 - mean) / std."""
    x = np.arange(256, dtype=np.float64)
    scale, offsets, exact = deepstream.scale_and_offsets({"mean": [0.5, 0.25, 0.1], "std": [0.3, 0.3, 0.3]})
    assert exact
    for c, mean in enumerate([0.5, 0.25, 0.1]):
        np.testing.assert_allclose(scale * (x - offsets[c]), (x / 255 - mean) / 0.3, rtol=1e-12, atol=1e-12)
    scale, _, exact = deepstream.scale_and_offsets(IMAGENET)
    assert not exact and scale == pytest.approx(1 / (255 * (0.229 + 0.224) / 2))


def test_labels_are_one_line_for_the_single_output_layer():
    assert deepstream.labels_txt(["bolt", "nut", "washer"]) == "bolt;nut;washer\n"
    with pytest.raises(EdgeVitError, match="cannot hold ';'"):
        deepstream.labels_txt(["m3;m4", "nut"])


@pytest.fixture
def ort_export(cpu_fp32_export):
    return cpu_fp32_export


@pytest.fixture(scope="module")
def trt_export(digits_bundle, tmp_path_factory):
    out = tmp_path_factory.mktemp("line") / "trt"
    return out, export_bundle(digits_bundle, "jetson-orin-nano-fp16", out)


def test_onnxruntime_export_writes_a_servable_triton_repository(ort_export):
    out, export = ort_export
    model_dir = out / "triton" / triton.model_name(export)
    config = parse_config((model_dir / "config.pbtxt").read_text())
    assert config.platform == "onnxruntime_onnx" and config.max_batch_size == 64
    assert (model_dir / "1" / "model.onnx").read_bytes() == (out / "model.onnx").read_bytes()
    assert (model_dir / "labels.txt").read_text().splitlines() == export["output"]["classes"]
    assert export["targets"] == {
        "triton": {
            "model": config.name,
            "repository": "triton",
            "model_file": "1/model.onnx",
            "model_file_from": "model.onnx",
        }
    }
    assert not (out / "deepstream").exists()
    assert json.loads((out / "export.json").read_text())["hashes"][f"triton/{config.name}/config.pbtxt"]


def test_tensorrt_export_writes_deepstream_and_triton_and_build_places_the_plan(trt_export, monkeypatch):
    out, export = trt_export
    props = read_nvinfer(out / "deepstream" / "config_infer.txt")
    assert (out / "deepstream" / props["onnx-file"]).resolve() == (out / "model.onnx").resolve()
    assert (out / "deepstream" / props["model-engine-file"]).resolve() == (out / "engine.plan").resolve()
    labels = (out / "deepstream" / props["labelfile-path"]).read_text()
    assert labels == ";".join(export["output"]["classes"]) + "\n"
    assert (
        export["targets"]["deepstream"]["exact"]
        and "WARNING" not in (out / "deepstream" / "config_infer.txt").read_text()
    )
    model_dir = out / "triton" / triton.model_name(export)
    config = parse_config((model_dir / "config.pbtxt").read_text())
    assert config.platform == "tensorrt_plan" and config.max_batch_size == 0
    assert list(config.input[0].dims) == [1, 1, 16, 16] and not any((model_dir / "1").iterdir())

    (out / "engine.plan").write_bytes(b"serialized-engine")  # what `edgevit build` writes, then places
    placed = triton.place_engine(out)
    assert placed == model_dir / "1" / "model.plan" and placed.read_bytes() == b"serialized-engine"


def test_tensorrt_export_carries_the_device_kit_from_the_package(trt_export, ort_export, tmp_path):
    """device/: the package's jetson/ scripts, runnable with no edgevit on the device."""
    import os
    import subprocess
    import sys

    out, export = trt_export
    kit = out / "device"
    for name, kit_name in devicekit.FILES.items():
        assert (kit / kit_name).read_bytes() == (shipped_dir("jetson") / name).read_bytes()
    assert all(os.access(kit / name, os.X_OK) for name in devicekit.EXECUTABLE)
    assert export["targets"]["device_kit"] == {"folder": "device", "files": sorted(devicekit.FILES.values())}
    assert "device/run_folder.py" in json.loads((out / "export.json").read_text())["hashes"]
    assert not (ort_export[0] / "device").exists()

    # the runner and its helper import without edgevit; benchmark.sh parses and refuses a missing engine
    probe = "import sys, run_folder, common; sys.exit(any(m.startswith('edgevit') for m in sys.modules))"
    subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(kit)!r}); {probe}"], check=True)
    done = subprocess.run([sys.executable, str(kit / "run_folder.py"), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "export_dir" in done.stdout
    done = subprocess.run(["bash", str(kit / "benchmark.sh"), str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == 2 and f"no {tmp_path}/engine.plan" in done.stderr


def test_per_channel_std_writes_the_nearest_scalar_with_a_measured_warning(image_folder, tmp_path):
    """An RGB model with ImageNet normalisation: nvinfer cannot express it exactly; the export says by how much."""
    from edgevit.data import data_ref
    from edgevit.vit import BundleMeta
    from edgevit.vit.bundle import BaseArch, Preprocessing, build_model

    torch.manual_seed(0)
    meta = BundleMeta(
        base=BaseArch(
            name="vit_tiny_patch16_224",
            kwargs={
                "img_size": 16,
                "in_chans": 3,
                "num_classes": 3,
                "patch_size": 4,
                "embed_dim": 48,
                "depth": 2,
                "num_heads": 3,
            },
        ),
        preprocessing=Preprocessing(size=16, channels=3, **IMAGENET),
        classes=["bolt", "nut", "washer"],
        data=data_ref(str(image_folder)),
        provenance={"method": "test"},
    )
    save_bundle(tmp_path / "bundle", build_model(meta), meta)
    export = export_bundle(tmp_path / "bundle", "jetson-orin-nano-fp16", tmp_path / "out")
    info = export["targets"]["deepstream"]
    cost = info["approximation"]
    assert not info["exact"] and 0 <= cost["top1_agreement"] <= 1 and cost["max_abs_logit_diff"] > 0
    assert cost["max_channel_scale_error"] == pytest.approx(0.0025 / ((0.229 + 0.224) / 2), rel=1e-4)
    text = (tmp_path / "out" / "deepstream" / "config_infer.txt").read_text()
    assert f"# WARNING: {info['warning']}" in text and "per-channel std" in info["warning"]
    props = read_nvinfer(tmp_path / "out" / "deepstream" / "config_infer.txt")
    assert props["model-color-format"] == "0" and props["infer-dims"] == "3;16;16"
    assert [float(o) for o in props["offsets"].split(";")] == pytest.approx([255 * m for m in IMAGENET["mean"]])

    # the recorded cost is what the graph does with nvinfer's preprocessing, recomputed independently
    from edgevit.data import split_arrays
    from edgevit.vit import read_meta

    images, _ = split_arrays(read_meta(tmp_path / "bundle"), "val", limit=64)
    scale = float(props["net-scale-factor"])
    raw = images * np.array(IMAGENET["std"]).reshape(1, 3, 1, 1) + np.array(IMAGENET["mean"]).reshape(1, 3, 1, 1)
    nvinfer_input = (scale * (255 * raw - np.array(IMAGENET["mean"]).reshape(1, 3, 1, 1) * 255)).astype(np.float32)
    exact = run_onnx(tmp_path / "out" / "model.onnx", images, 1)
    approx = run_onnx(tmp_path / "out" / "model.onnx", nvinfer_input, 1)
    assert np.abs(exact - approx).max() == pytest.approx(cost["max_abs_logit_diff"], rel=1e-3, abs=1e-5)


def test_secondary_classifier_on_a_detectors_objects(tmp_path):
    from edgevit.export.profiles import parse_profile

    base = next(p for p in PROFILES if p.name == "jetson-orin-nano-fp16").model_dump(mode="json")
    profile = parse_profile(
        {
            **base,
            "deepstream": {
                "mode": "secondary",
                "gie_unique_id": 2,
                "operate_on_gie_id": 1,
                "operate_on_class_ids": [0, 2],
                "classifier_threshold": 0.5,
            },
        }
    )
    (tmp_path / "c.txt").write_text(deepstream.config_infer(fake_export(profile), profile))
    props = read_nvinfer(tmp_path / "c.txt")
    assert set(props) <= NVINFER_PROPERTY_KEYS
    assert (props["process-mode"], props["gie-unique-id"], props["operate-on-gie-id"]) == ("2", "2", "1")
    assert props["operate-on-class-ids"] == "0;2" and props["classifier-threshold"] == "0.5"
    with pytest.raises(EdgeVitError, match="needs operate_on_gie_id"):
        parse_profile({**base, "deepstream": {"mode": "secondary"}})
    with pytest.raises(EdgeVitError, match="unknown key 'deepstream.operate_on_gie'; did you mean 'operate_on_gie_id'"):
        parse_profile({**base, "deepstream": {"mode": "secondary", "operate_on_gie": 1}})
