"""Every export carries a Triton model repository whose config parses with Triton's own ModelConfig proto."""

from __future__ import annotations

import os

import pytest
from google.protobuf import text_format

from edgevit.export import export_bundle

model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="tritonclient not installed")


@pytest.mark.parametrize(("profile", "platform", "max_batch", "model_file"), [
    ("cpu-ort-fp32", "onnxruntime_onnx", 64, "model.onnx"),
    ("jetson-orin-nano-int8", "tensorrt_plan", 1, "model.plan"),
])
def test_triton_repository_parses_with_tritons_proto(digits_bundle, tmp_path, profile, platform, max_batch,
                                                     model_file):
    out = tmp_path / "orin int8"  # a name Triton cannot take as is
    export = export_bundle(digits_bundle, profile, out)
    model = out / "triton" / "orin_int8"
    config = text_format.Parse((model / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (config.name, config.platform, config.max_batch_size) == ("orin_int8", platform, max_batch)
    assert config.default_model_filename == model_file
    assert [(i.name, list(i.dims)) for i in config.input] == [(export["input"]["name"], [1, 16, 16])]
    assert config.input[0].data_type == model_config_pb2.TYPE_FP32
    assert [(o.name, list(o.dims), o.label_filename) for o in config.output] == [
        (export["output"]["name"], [10], "labels.txt")]
    assert (model / "labels.txt").read_text().split() == export["output"]["classes"]
    assert config.HasField("dynamic_batching") == (max_batch > 1)
    if max_batch > 1:
        assert list(config.dynamic_batching.preferred_batch_size) == [64]
    assert config.instance_group[0].kind == (model_config_pb2.ModelInstanceGroup.KIND_CPU if platform ==
                                             "onnxruntime_onnx" else model_config_pb2.ModelInstanceGroup.KIND_GPU)
    if platform == "onnxruntime_onnx":
        assert os.path.samefile(model / "1" / model_file, out / export["deploy_onnx"])
    else:  # built on the device; build_engine.sh places it
        assert (model / "1").is_dir() and "triton/*/1" in (out / "build_engine.sh").read_text()
