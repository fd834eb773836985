"""What INT8 graphs compute on each kind of CPU, what an export records of it, and the one-line warning where a
graph's recipe needs more than the CPU has."""

from __future__ import annotations

import json
import logging

import pytest
from click.testing import CliRunner

from edgevit import cpu
from edgevit.cli import main

# /proc/cpuinfo flags of the machines this project's CI rotates through (abridged)
EPYC_AVX2 = "fpu sse4_2 avx avx2 fma bmi2 sha_ni"
EPYC_VNNI = EPYC_AVX2 + " avx512f avx512bw avx512_vnni avx512_bf16"
XEON_AMX = EPYC_VNNI + " amx_bf16 amx_tile amx_int8"


@pytest.mark.parametrize("arch, flags, saturating", [
    ("x86_64", EPYC_AVX2, True), ("x86_64", EPYC_VNNI, False), ("x86_64", XEON_AMX, False),
    ("x86_64", "fpu sse4_2 avx avx2 avx_vnni", False),  # Alder Lake: VNNI in AVX2 encoding
    ("x86_64", "fpu sse4_2", False),  # no AVX2: ORT widens to 16 bits, exact
    ("aarch64", "fp asimd asimddp", False),
])
def test_which_cpus_saturate_u8s8_pairs(arch, flags, saturating):
    info = cpu.CpuInfo(arch, "test CPU", frozenset(flags.split()))
    assert info.saturating_u8s8 is saturating and info.u8s8 == ("saturating" if saturating else "exact")
    assert (cpu.lacks(cpu.EXACT_U8S8, info) is not None) is saturating
    assert cpu.lacks(None, info) is None  # int7 / uint8 weights need nothing
    assert ("saturation" in info.int8_line()) is saturating


def test_doctor_shows_the_cpus_int8_features_and_what_they_mean():
    result = CliRunner().invoke(main, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    reported = json.loads(result.output)["cpu"]
    here = cpu.cpu_info()
    assert reported["features"] == here.features and reported["u8s8"] == here.u8s8
    assert reported["int8"] == here.int8_line()
    text = CliRunner().invoke(main, ["doctor"]).output
    assert "cpu: " in text and here.int8_line() in text


def test_a_graph_needing_vnni_warns_once_on_a_cpu_without_it(fp32_export_int8, monkeypatch, caplog):
    from edgevit import Predictor

    out, needs = fp32_export_int8
    monkeypatch.setattr(cpu, "cpu_info", lambda: cpu.CpuInfo("x86_64", "EPYC", frozenset(EPYC_AVX2.split())))
    with caplog.at_level(logging.WARNING, logger="edgevit"):
        Predictor(out)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and needs.split(" (")[0] in warnings[0] and "int7" in warnings[0]
    caplog.clear()
    monkeypatch.setattr(cpu, "cpu_info", lambda: cpu.CpuInfo("x86_64", "Xeon", frozenset(XEON_AMX.split())))
    with caplog.at_level(logging.WARNING, logger="edgevit"):
        Predictor(out)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


@pytest.fixture(scope="module")
def fp32_export_int8(digits_bundle, tmp_path_factory):
    """cpu-ort-int8 with 8-bit weights (the recipe before #28): its export.json says it needs VNNI, AMX or ARM."""
    import yaml

    from edgevit.export import export_bundle, load_profile

    work = tmp_path_factory.mktemp("vnni")
    profile = load_profile("cpu-ort-int8").model_dump(mode="json")
    profile["int8"] |= {"weight_type": "int8", "max_top1_drop": 1.0}
    (work / "int8.yaml").write_text(yaml.safe_dump(profile))
    export = export_bundle(digits_bundle, work / "int8.yaml", work / "out")
    assert export["int8"]["cpu"]["needs"] == cpu.EXACT_U8S8
    return work / "out", export["int8"]["cpu"]["needs"]
