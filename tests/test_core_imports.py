"""The core never imports WebUI code: only host_* modules may."""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "loratorio"
FORBIDDEN = {"modules", "gradio", "backend", "ldm", "sgm", "k_diffusion", "launch", "webui", "extensions_builtin",
             "networks", "lora", "network", "packages_3rdparty", "scripts"}


def core_files():
    return sorted(p for p in PACKAGE.glob("*.py") if not p.name.startswith("host_"))


def imported_roots(path):
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_core_files_exist():
    names = {p.name for p in core_files()}
    assert {"fusion.py", "lora.py", "routing.py", "selection.py", "engine.py"} <= names


@pytest.mark.parametrize("path", core_files(), ids=lambda p: p.name)
def test_core_module_imports_no_host_code(path):
    bad = imported_roots(path) & FORBIDDEN
    assert not bad, f"{path.name} imports host code: {sorted(bad)}"


def test_checker_catches_a_host_import(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("import torch\nfrom modules import shared\nimport gradio as gr\n")
    assert imported_roots(sample) & FORBIDDEN == {"modules", "gradio"}
