"""The Makefile's set-up refuses a too-small disk before it creates a venv."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_new_venv_stops_with_a_clear_message_when_the_disk_is_short(tmp_path):
    shutil.copy(ROOT / "Makefile", tmp_path / "Makefile")
    (tmp_path / "pyproject.toml").write_text("")
    venv = tmp_path / "venv"
    # Ask for more space than any disk has: the check must stop make before `python -m venv`.
    # PIN=--version keeps pip from installing anything should the check ever be skipped.
    r = subprocess.run(["make", "install", f"VENV={venv}", "VENV_GB=1e9", "PIN=--version",
                        f"PYTHON={sys.executable}"],
                       cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    assert "GiB free on" in r.stderr and "VENV=" in r.stderr
    assert "Traceback" not in r.stderr
    assert not venv.exists()
