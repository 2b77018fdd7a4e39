"""Production code (``megatron_coe/`` outside ``testing/``) never imports ``megatron_coe.testing``."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "megatron_coe"


def _imported_modules(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def test_production_code_never_imports_testing():
    offenders = sorted(
        f"{p.relative_to(ROOT).as_posix()}: {name}"
        for p in ROOT.rglob("*.py") if "testing" not in p.relative_to(ROOT).parts
        for name in _imported_modules(p)
        if name == "megatron_coe.testing" or name.startswith("megatron_coe.testing.")
    )
    assert offenders == []


def test_the_walker_sees_a_testing_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from megatron_coe.testing.distributed import run_distributed\n")
    assert "megatron_coe.testing.distributed" in set(_imported_modules(probe))
