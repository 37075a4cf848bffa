"""Test files share code through the helper modules (tests/conftest.py, tests/runs.py, tests/latent_shards.py,
...), never through each other: importing a test file from another runs its module-level code and fixtures
there, and ties one file's tests to another's private helpers."""

import ast
import pathlib
import textwrap

TESTS = pathlib.Path(__file__).resolve().parent


def _is_test_module(dotted: str) -> bool:
    return dotted.rpartition(".")[2].startswith("test_")


def find_test_module_imports(source: str) -> list[tuple[int, str]]:
    """(line, module) of every import of a test_*.py module in `source`, at any depth (a function's
    local import counts), including importlib.import_module("test_x") and __import__("test_x")."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if _is_test_module(a.name)]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if _is_test_module(module):
                found.append((node.lineno, "." * node.level + module))
            elif not module or module.rpartition(".")[2] == "tests":  # from tests import test_x; from . import test_x
                found += [(node.lineno, a.name) for a in node.names if _is_test_module(a.name)]
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
            if name in ("import_module", "__import__") and isinstance(node.args[0].value, str) \
                    and _is_test_module(node.args[0].value):
                found.append((node.lineno, node.args[0].value))
    return sorted(found)


def test_no_test_file_imports_another_test_file():
    files = sorted(TESTS.glob("test_*.py"))
    assert len(files) > 10, f"expected the test files in {TESTS}"
    offenders = [f"{path.name}:{line}: imports {module}"
                 for path in files for line, module in find_test_module_imports(path.read_text())]
    assert offenders == [], "move what is shared into a helper module (tests/runs.py, ...):\n" + "\n".join(offenders)


def test_the_finder_catches_every_form_and_only_those():
    source = textwrap.dedent("""\
        import os
        import pytest
        from conftest import REPO
        from runs import train, losses
        from latent_shards import make_latent_shards
        from i2v.data import latent_order
        import testing_tools
        from test_train import train
        import test_resume
        import tests.test_flops as flops
        from tests.test_validation import _events
        from tests import test_precompute, runs
        from . import test_memory
        from .test_export import _env


        def test_something():
            from test_lora_ema import LORA
            import importlib
            importlib.import_module("test_reshard")
            importlib.import_module("runs")
            __import__("test_interrupt")
        """)
    assert find_test_module_imports(source) == [
        (8, "test_train"), (9, "test_resume"), (10, "tests.test_flops"), (11, "tests.test_validation"),
        (12, "test_precompute"), (13, "test_memory"), (14, ".test_export"), (18, "test_lora_ema"),
        (20, "test_reshard"), (22, "test_interrupt")]
    assert find_test_module_imports("from runs import train\nimport pytest\n") == []
