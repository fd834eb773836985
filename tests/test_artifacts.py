"""The export-directory module: export.json's error paths name the user's path, in the library and the CLI."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from PIL import Image

from edgevit.bench.backends import open_artifact
from edgevit.cli import main
from edgevit.errors import EdgeVitError
from edgevit.export.artifacts import EXPORT_JSON, SCHEMA_VERSION, read_export, write_export


def test_write_then_read_round_trips(tmp_path):
    export = {"schema_version": SCHEMA_VERSION, "deploy_onnx": "model.onnx"}
    write_export(tmp_path, export)
    assert read_export(tmp_path) == export
    assert not [p for p in tmp_path.iterdir() if p.name != EXPORT_JSON]  # nothing half-written beside it


@pytest.mark.parametrize("case, text, expected", [
    ("missing", None, "is not an export directory (no export.json)"),
    ("corrupt", '{"schema_version": 1,', "is not valid JSON"),
    ("not-an-object", "[1]", f"schema_version None is not supported (expected {SCHEMA_VERSION})"),
    ("wrong-schema", json.dumps({"schema_version": SCHEMA_VERSION + 1}),
     f"schema_version {SCHEMA_VERSION + 1} is not supported (expected {SCHEMA_VERSION})"),
])
def test_bad_export_json_is_one_error_naming_the_path(case, text, expected, tmp_path):
    out = tmp_path / case
    out.mkdir()
    if text is not None:
        (out / EXPORT_JSON).write_text(text)
    with pytest.raises(EdgeVitError, match="^" + str(out)) as err:
        read_export(out)
    assert expected in str(err.value)


@pytest.mark.parametrize("text", ['{"schema_version": 1,', json.dumps({"schema_version": 99})])
def test_profile_and_predict_refuse_a_bad_export_json_in_one_line(text, tmp_path):
    (tmp_path / EXPORT_JSON).write_text(text)
    Image.new("L", (8, 8)).save(tmp_path / "x.png")
    with pytest.raises(EdgeVitError, match=str(tmp_path / EXPORT_JSON)):
        open_artifact(tmp_path)
    for args in (["profile", str(tmp_path), "-o", str(tmp_path / "r.jsonl")],
                 ["predict", str(tmp_path), str(tmp_path / "x.png")]):
        result = CliRunner().invoke(main, args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and str(tmp_path / EXPORT_JSON) in lines[0]
    assert not (tmp_path / "r.jsonl").exists()
