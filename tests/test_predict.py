"""edgevit predict and Predictor: export.json's preprocessing, the profile backends, and the same top-1."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from edgevit import Predictor
from edgevit.cli import main
from edgevit.data import load_ref
from edgevit.vit import read_meta


@pytest.fixture(scope="module")
def digits_export(cpu_fp32_export):
    return cpu_fp32_export[0]


@pytest.fixture(scope="module")
def digits_test(digits_export):
    """The digits test split as the pixels it was made from: ``N x H x W`` floats in [0, 1], and class names."""
    meta = read_meta(digits_export / "bundle")
    dataset = load_ref(meta.data, "test", meta.preprocessing)
    pre = meta.preprocessing
    pixels = dataset.images[:, 0].numpy() * pre.std[0] + pre.mean[0]
    return pixels, [meta.classes[t] for t in dataset.targets]


@pytest.fixture(scope="module")
def profile_top1(digits_export, tmp_path_factory):
    results = tmp_path_factory.mktemp("profile") / "results.jsonl"
    run = CliRunner().invoke(
        main,
        [
            "profile",
            str(digits_export),
            "--backend",
            "ort",
            "--batch",
            "1",
            "--iterations",
            "2",
            "--warmup",
            "0",
            "--threads",
            "1",
            "-o",
            str(results),
        ],
    )
    assert run.exit_code == 0, run.output
    (row,) = [json.loads(line) for line in results.read_text().splitlines()]
    return row["top1"]


def test_predictor_reproduces_profiles_top1_on_the_digits_test_split(digits_export, digits_test, profile_top1):
    pixels, truths = digits_test
    predictions = Predictor(digits_export).predict(list(pixels))
    top1 = np.mean([p.label == t for p, t in zip(predictions, truths, strict=True)])
    assert top1 == pytest.approx(profile_top1, abs=1e-5) and len(predictions) == len(truths) > 300
    single = Predictor(digits_export, backend="torch", device="cpu").predict(pixels[0], top_k=3)
    assert single.label == predictions[0].label and len(single.top_k) == 3
    assert single.probability == pytest.approx(predictions[0].probability, abs=1e-4)
    assert [c for c, _ in single.top_k][0] == single.label and sum(q for _, q in single.top_k) <= 1 + 1e-6


def test_cli_on_a_class_folder_scores_it_and_matches_predictor(digits_export, digits_test, profile_top1, tmp_path):
    pixels, truths = digits_test
    folder = tmp_path / "test"
    for i, (image, truth) in enumerate(zip(pixels, truths, strict=True)):
        (folder / truth).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.round(image * 255).astype(np.uint8), "L").save(folder / truth / f"{i:04d}.png")
    table = tmp_path / "predictions.csv"
    run = CliRunner().invoke(
        main, ["predict", str(digits_export), str(folder), "--top-k", "2", "--csv", str(table), "--json"]
    )
    assert run.exit_code == 0, run.output
    result = json.loads(run.output)
    ev = result["evaluation"]
    matrix = np.array(ev["confusion"])
    n = len(truths)
    assert ev["images"] == matrix.sum() == n and np.trace(matrix) / n == pytest.approx(ev["top1"])
    # 8-bit PNGs of the float test images: the same classes as the floats up to rounding of the pixels
    assert ev["top1"] == pytest.approx(profile_top1, abs=2 / n)
    assert ev["per_class"]["3"] == pytest.approx(matrix[3, 3] / matrix[3].sum())
    files = [p["source"] for p in result["predictions"]]
    in_process = Predictor(digits_export).predict(files, top_k=2)
    assert [p.label for p in in_process] == [p["label"] for p in result["predictions"]]
    rows = list(csv.DictReader(table.open()))
    assert len(rows) == n and rows[0]["true_class"] == "0" and rows[0]["label"] == result["predictions"][0]["label"]


def test_text_output_and_bad_inputs(digits_export, tmp_path):
    image = tmp_path / "one.png"
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(image)
    run = CliRunner().invoke(main, ["predict", str(digits_export), str(image)])
    assert run.exit_code == 0 and run.output.startswith(str(image)) and "top-1" not in run.output
    (tmp_path / "broken.png").write_bytes(b"not a png")
    for args, match in [
        ([str(tmp_path / "missing.png")], "missing.png does not exist"),
        ([str(tmp_path / "broken.png")], "cannot read image"),
        ([str(tmp_path / "*.jpg")], "no files match"),
    ]:
        run = CliRunner().invoke(main, ["predict", str(digits_export), *args])
        lines = [line for line in run.output.splitlines() if line.strip()]
        assert run.exit_code == 2 and len(lines) == 1 and match in lines[0], run.output
    run = CliRunner().invoke(main, ["predict", str(tmp_path), str(image)])
    assert run.exit_code == 2 and "neither an export directory" in run.output


def test_arrays_and_images_are_preprocessed_alike(digits_export):
    from edgevit.errors import EdgeVitError

    predictor = Predictor(digits_export)
    gray = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    from_file = predictor.preprocess(Image.fromarray(gray))
    np.testing.assert_array_equal(predictor.preprocess(gray), from_file)
    np.testing.assert_allclose(predictor.preprocess(gray.astype(np.float32) / 255), from_file, atol=1e-6)
    rgb = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    np.testing.assert_array_equal(predictor.preprocess(rgb), predictor.preprocess(Image.fromarray(rgb, "RGB")))
    with pytest.raises(EdgeVitError, match="pass a list of arrays for a batch"):
        predictor.preprocess(np.zeros((8, 16, 16), np.float32))
