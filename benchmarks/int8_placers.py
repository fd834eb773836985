"""ModelOpt vs edgevit's own Q/DQ placer on one bundle, linear-only vs linear + attention INT8.

Each variant is a full ``edgevit export`` of a TensorRT INT8 profile (default jetson-orin-nano-int8, its own
calibration settings) with ``int8.quantizer`` and ``int8.quantize_attention_matmuls`` changed. Prints, per variant,
the precision report line, the Q/DQ pair count and the val/test top-1 of the graph TensorRT would build (run by
ONNX Runtime on the CPU) next to FP32's. This is what chose the shipped INT8 defaults (see the profiles).

    python benchmarks/int8_placers.py runs/base
    python benchmarks/int8_placers.py runs/v224 --profile desktop-gpu-int8
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from edgevit.export import export_bundle, load_profile
from edgevit.export.quantize import modelopt_available

VARIANTS = [("modelopt", False), ("modelopt", True), ("static", False), ("static", True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--profile", default="jetson-orin-nano-int8")
    args = parser.parse_args()
    base = load_profile(args.profile)
    print(f"bundle {args.bundle}, profile {base.name}, calibration {base.calibration.model_dump()}")
    with tempfile.TemporaryDirectory() as work:
        for quantizer, attention in VARIANTS:
            if quantizer == "modelopt" and not modelopt_available():
                print("modelopt: not installed (pip install 'edgevit[quant]'), skipped")
                continue
            int8 = base.int8.model_copy(update={"quantizer": quantizer, "quantize_attention_matmuls": attention,
                                                "max_top1_drop": 1.0})
            profile = base.model_copy(update={"int8": int8})
            out = Path(work) / f"{quantizer}-{attention}"
            export = export_bundle(args.bundle, profile, out)
            q = export["int8"]
            print(f"\n{'ModelOpt' if quantizer == 'modelopt' else 'own placer'}, "
                  f"{'linear + attention' if attention else 'linear only'} ({q['method']}): "
                  f"{q['qdq']['QuantizeLinear']} QuantizeLinear")
            print(f"  {export['graph']['precision']['line']}")
            print(f"  val top-1 {q['fp32_val_top1']:.4f} -> {q['int8_val_top1']:.4f} ({q['delta']:+.4f}), "
                  f"test {q['fp32_test_top1']:.4f} -> {q['int8_test_top1']:.4f} "
                  f"({q['int8_test_top1'] - q['fp32_test_top1']:+.4f}); {q['val_images']}/{q['test_images']} images")


if __name__ == "__main__":
    main()
