"""The wheel a user installs: it carries every shipped file and works from a folder outside the repository."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from setuptools import find_packages

from edgevit.export.devicekit import FILES as DEVICE_KIT
from edgevit.resources import SHIPPED

tomllib = pytest.importorskip("tomllib", reason="tomllib is Python >= 3.11")
REPO = Path(__file__).resolve().parents[1]


def shipped_files() -> list[str]:
    """What the wheel must hold: every file of the top-level shipped folders, at its package path."""
    return sorted(f"edgevit/{p.relative_to(REPO)}" for folder in SHIPPED for p in (REPO / folder).iterdir()
                  if p.is_file())


def test_package_list_covers_every_source_package():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    assert set(find_packages(str(REPO), include=["edgevit*"])) <= listed
    assert {f"edgevit.{folder}" for folder in SHIPPED} <= listed


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(out), str(REPO)],
                   check=True, capture_output=True)
    return next(out.glob("edgevit-*.whl"))


@pytest.fixture(scope="module")
def wheel_env(wheel, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (not editable). Its third-party packages are borrowed from this
    interpreter's site-packages (a path in a .pth file: the editable install's own .pth there is not run)."""
    env = tmp_path_factory.mktemp("venv") / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env)], check=True)
    site = next((env / "lib").glob("python3*/site-packages"))
    (site / "borrowed.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    python = env / "bin" / "python"
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-deps", str(wheel)], check=True,
                   capture_output=True)
    return env


def test_wheel_holds_every_shipped_file(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [f for f in shipped_files() if f not in names]
    assert not missing, f"not in the wheel: {missing}"


@pytest.mark.slow
def test_wheel_install_works_outside_the_repository(wheel_env, digits_bundle, tmp_path):
    def edgevit(*args: str) -> str:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EDGEVIT_PROFILES")}
        done = subprocess.run([wheel_env / "bin" / "edgevit", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr
        return done.stdout

    where = subprocess.run([wheel_env / "bin" / "python", "-c", "import edgevit; print(edgevit.__file__)"],
                           cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    assert Path(where).is_relative_to(wheel_env) and not Path(where).is_relative_to(REPO)

    listed = edgevit("profiles", "list")
    for profile in (REPO / "export_profiles").glob("*.yaml"):
        assert profile.stem in listed
    for profile in ("cpu-ort-fp32", "jetson-orin-nano-fp16"):  # an ONNX Runtime and a TensorRT one (device kit)
        edgevit("export", str(digits_bundle), "--profile", profile, "-o", profile)
        assert json.loads((tmp_path / profile / "export.json").read_text())["profile"]["name"] == profile
    kit = tmp_path / "jetson-orin-nano-fp16" / "device"  # the device kit comes from the installed package
    assert sorted(p.name for p in kit.iterdir()) == sorted(DEVICE_KIT.values())
    assert "Usage" in edgevit("demo", "--help")
