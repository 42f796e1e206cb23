"""The package's shape, enforced: import-linter's contracts in pyproject.toml (training and
evaluation independent, a core that imports neither, the toy world reached only by name), and
no module outside deradiff/toy/ that asks whether it is looking at the toy."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    if not Path(exe).exists():
        pytest.fail("lint-imports not installed: pip install -e '.[test]' (import-linter)")
    proc = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True, text=True)
    broken = [ln for ln in proc.stdout.splitlines() if ln.endswith("BROKEN")]
    assert proc.returncode == 0, "import contracts broken:\n" + "\n".join(broken) + "\n" + proc.stdout[-3000:]
    assert "BROKEN" not in proc.stdout and proc.stdout.count("KEPT") >= 5


def test_no_toy_special_cases_outside_the_toy_plugin():
    pattern = re.compile(r"""(==|!=)\s*["']toy["']|["']toy["']\s*(==|!=)|startswith\(\s*\(?["']toy:""")
    offenders = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in sorted((ROOT / "deradiff").rglob("*.py"))
        if "toy" not in path.relative_to(ROOT / "deradiff").parts
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if pattern.search(line)
    ]
    assert not offenders, "toy special cases outside deradiff/toy/:\n" + "\n".join(offenders)
