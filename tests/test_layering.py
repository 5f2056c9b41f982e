"""Imports flow one way: models -> adapters -> training / evaluation -> studies -> analyses.

``evaluation`` measures trained models and needs neither the trainers (:mod:`mechdiff.training`)
nor the real pair's sources (:mod:`mechdiff.real`); the workloads registry imports the chat
workload (and with it :mod:`mechdiff.real.chat`) only when a chat workload is asked for.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EVALUATION = sorted((ROOT / "mechdiff" / "evaluation").glob("*.py"))
FORBIDDEN = ("mechdiff.real", "mechdiff.training")


def imported_modules(path: Path) -> set[str]:
    """Every module ``path`` imports, at the top or inside a function (``from a import b``: a and a.b)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            out |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return out


def _forbidden(names) -> list[str]:
    return sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in FORBIDDEN))


def test_the_checker_sees_imports_in_function_bodies(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("import os\ndef f():\n    from mechdiff.real import chat\n    import mechdiff.training.loop\n")
    assert _forbidden(imported_modules(src)) == ["mechdiff.real", "mechdiff.real.chat", "mechdiff.training.loop"]


@pytest.mark.parametrize("path", EVALUATION, ids=lambda p: p.name)
def test_evaluation_does_not_import_training_or_real(path):
    assert _forbidden(imported_modules(path)) == []


def test_importing_evaluation_pulls_in_neither_training_nor_real():
    """Not even through what it imports (the workloads, the adapters, the models)."""
    modules = [f"mechdiff.evaluation.{p.stem}" for p in EVALUATION if p.stem != "__init__"]
    code = (
        f"import importlib, sys\nfor m in {modules!r}: importlib.import_module(m)\n"
        "import mechdiff.workloads as w\n"
        "print(sorted(m for m in sys.modules if m.startswith(('mechdiff.real', 'mechdiff.training'))))\n"
        "w.ChatWorkload\nprint('mechdiff.real.chat' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split("\n")[:2] == ["[]", "True"]


def test_hf_conversion_is_below_models():
    """The conversion module imports nothing of mechdiff (models builds on it, never the reverse)."""
    path = ROOT / "mechdiff" / "hf_conversion.py"
    assert sorted(n for n in imported_modules(path) if n.startswith("mechdiff")) == []
    code = "import sys, mechdiff.hf_conversion\nprint(sorted(m for m in sys.modules if m.startswith('mechdiff.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "['mechdiff.hf_conversion']"
