"""edgevit doctor: every component named, every shipped profile judged, Jetson facts read from the files."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from edgevit import doctor
from edgevit.cli import main

REPO = Path(__file__).resolve().parents[1]


def test_doctor_json_names_every_component_and_judges_every_profile():
    result = CliRunner().invoke(main, ["doctor", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert set(report["components"]) == set(doctor.COMPONENTS)
    assert report["components"]["onnxruntime"]["installed"]
    assert "CPUExecutionProvider" in report["components"]["onnxruntime"]["providers"]
    rows = {p["name"]: p for p in report["profiles"]}
    assert {p.stem for p in (REPO / "export_profiles").glob("*.yaml")} <= set(rows)
    for row in rows.values():
        assert row["export"]
        if row["runtime"] == "onnxruntime":
            assert row["build"] is None
        elif not report["components"]["tensorrt"]["installed"]:  # this CPU machine: no engine, with the reason
            assert row["build"] is False and "tensorrt is not installed" in row["build_note"]


def test_jetson_release_power_mode_and_board_are_read(tmp_path, monkeypatch):
    release = tmp_path / "nv_tegra_release"
    release.write_text("# R36 (release), REVISION: 4.3, GCID: 38968081, BOARD: generic, EABI: aarch64\n")
    model = tmp_path / "model"
    model.write_text("NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super\x00")
    nvpmodel = tmp_path / "nvpmodel"
    nvpmodel.write_text("#!/bin/sh\necho 'NV Power Mode: MAXN_SUPER'\necho 2\n")
    nvpmodel.chmod(0o755)
    monkeypatch.setattr(doctor, "TEGRA_RELEASE", release)
    monkeypatch.setattr(doctor, "DEVICE_MODEL", model)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert doctor.jetson() == {"l4t": "36.4.3", "jetpack": "6.2", "power_mode": "MAXN_SUPER",
                               "model": "NVIDIA Jetson Orin Nano Engineering Reference Developer Kit Super"}
    release.write_text("# R35 (release), REVISION: 5.0, GCID: 1\n")
    assert doctor.jetson()["jetpack"] == "5.1.3"


def test_not_a_jetson(tmp_path, monkeypatch):
    monkeypatch.setattr(doctor, "TEGRA_RELEASE", tmp_path / "missing")
    assert doctor.jetson() is None
