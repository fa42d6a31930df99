"""The wheel carries the package, py.typed, the console script and every shipped mapping file."""

from __future__ import annotations

import configparser
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    pytest.importorskip("hatchling")
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-t", "wheel", "-d", str(out)],
        cwd=ROOT,
        check=True,
        capture_output=True,
    )
    return next(out.glob("weightport-*.whl"))


def test_wheel_contents(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "weightport/py.typed" in names and "weightport/__init__.py" in names
    for toml in (ROOT / "mappings").glob("*.toml"):
        assert f"weightport/mappings/{toml.name}" in names, toml.name
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    cfg = configparser.ConfigParser()
    cfg.read_string(zipfile.ZipFile(wheel).read(entry).decode())
    assert cfg["console_scripts"]["weightport"] == "weightport.cli:main"
    assert not any(n.startswith("tests/") for n in names)


@pytest.mark.slow
def test_installed_wheel_finds_its_mappings(wheel, tmp_path):
    zipfile.ZipFile(wheel).extractall(tmp_path)
    code = "import weightport, json; print(json.dumps(weightport.list_mappings()))"
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PYTHONPATH": str(tmp_path), "PATH": ""},
    )
    assert res.returncode == 0, res.stderr
    shipped = sorted(p.stem for p in (ROOT / "mappings").glob("*.toml"))
    assert len(__import__("json").loads(res.stdout)) == len(shipped)
