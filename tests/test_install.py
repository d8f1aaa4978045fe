"""The install: nothing of ours shadows an ecosystem package, launchers run what is installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_SPEC = ("import importlib.util, json; s = importlib.util.find_spec('kernels'); "
         "print(json.dumps(None if s is None else [s.origin, list(s.submodule_search_locations or [])]))")


def _kernels_spec(cwd: Path):
    out = subprocess.run([sys.executable, "-c", _SPEC], cwd=cwd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_repository_root_does_not_shadow_hf_kernels(tmp_path):
    """``python -m ...`` from the root puts the root first on sys.path; ``import kernels`` there must
    still give Hugging Face's package (transformers >= 5.25 imports it while building any model)."""
    installed = _kernels_spec(tmp_path)
    assert installed is not None, "Hugging Face's kernels is not installed (transformers needs it; constraints/cpu.txt)"
    origin, _ = installed
    assert origin and "site-packages" in Path(origin).parts, origin  # an installed package (a venv may sit in the checkout)
    assert not Path(origin).resolve().is_relative_to(REPO / "kernels"), origin
    from_root = _kernels_spec(REPO)
    assert from_root == installed, (from_root, installed)
    assert not (REPO / "kernels" / "__init__.py").exists()


def test_ops_import_as_distill_kernels_from_anywhere(tmp_path):
    code = "import distill_kernels.ref as r, distill_kernels; print(r.__file__); print(distill_kernels.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    for line in out.stdout.split():
        assert Path(line).resolve().is_relative_to(REPO / "kernels" / "distill_kernels"), line


def test_launcher_without_install_says_so_in_one_line():
    """``python -S`` leaves site-packages (where the editable install lives) off sys.path: the launcher
    must not find the checkout's own tree by itself, and says how to install."""
    for script in sorted((REPO / "launchers").glob("*.py")):
        out = subprocess.run([sys.executable, "-S", str(script), "--help"], cwd=REPO, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 1, (script.name, out.returncode, out.stderr[-400:])
        lines = out.stderr.strip().splitlines()
        assert len(lines) == 1 and "pip install -e ." in lines[0] and script.name in lines[0], (script.name, out.stderr)
