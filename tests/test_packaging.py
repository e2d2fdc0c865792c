"""The package: console scripts that resolve, honest dependencies (no PyTorch, transformers, mindone
or gradio at run time), extras whose files exist, and, where the package is installed (scripts/
setup_env.sh installs it), the installed metadata and a console command that runs.

A full `pip install .` into a fresh virtual environment is a manual check (docs/inference.md, "The
package"): it downloads MindSpore, too slow for every CI run."""

import ast
import importlib
import importlib.metadata
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
NOT_AT_RUN_TIME = {"torch", "transformers", "mindone", "gradio", "selenium", "pytest"}


def requirement_names(path: Path) -> set[str]:
    lines = [line.split("#")[0].strip() for line in path.read_text().splitlines()]
    return {line.split("==")[0].lower() for line in lines if line}


def test_console_scripts_resolve_to_commands_with_a_main():
    scripts = PYPROJECT["project"]["scripts"]
    assert {"emu3-generate", "emu3-vqa", "emu3-reconstruct", "emu3-benchmark", "emu3-web-demo"} <= set(scripts)
    for name, target in scripts.items():
        module, function = target.split(":")
        command = getattr(importlib.import_module(module), function)
        assert callable(importlib.import_module(command.module).main), name


def test_runtime_dependencies_are_honest():
    dynamic = PYPROJECT["tool"]["setuptools"]["dynamic"]
    assert dynamic["dependencies"]["file"] == ["requirements.txt"]
    runtime = requirement_names(ROOT / "requirements.txt")
    assert not runtime & NOT_AT_RUN_TIME, runtime & NOT_AT_RUN_TIME
    extras = {name: set().union(*(requirement_names(ROOT / f) for f in spec["file"]))
              for name, spec in dynamic["optional-dependencies"].items()}
    assert {"torch", "transformers"} <= extras["reference"] <= extras["test"]
    assert "gradio" in extras["demo"] and "pytest" in extras["test"]


def test_nothing_imports_a_test_or_demo_dependency_at_module_level():
    """emu3/ and train/ import PyTorch, transformers and gradio only inside the functions that need them
    (the benchmark's --compare-reference, the web demo), never on import."""
    found = []
    for path in [*ROOT.glob("emu3/**/*.py"), *ROOT.glob("train/**/*.py")]:
        for node in ast.parse(path.read_text()).body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.relative_to(ROOT)}: {n}" for n in names if n.split(".")[0] in NOT_AT_RUN_TIME]
    assert not found, found


def test_the_installed_package_matches_and_its_commands_run():
    try:
        distribution = importlib.metadata.distribution("emu3-mindspore")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("the package is not installed in this environment (bash scripts/setup_env.sh installs it)")
    installed = {e.name: e.value for e in distribution.entry_points if e.group == "console_scripts"}
    assert installed == PYPROJECT["project"]["scripts"]
    assert not {r.split(" ")[0].split("=")[0].lower() for r in distribution.requires or []
                if "extra ==" not in r} & NOT_AT_RUN_TIME
    command = shutil.which("emu3-generate", path=str(Path(sys.executable).parent))
    result = subprocess.run([command, "--ratio", "abc"], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "ratio must be 'W:H'" in result.stderr


def test_web_demo_script_help_needs_no_gradio():
    result = subprocess.run(["bash", str(ROOT / "scripts" / "web_demo.sh"), "--help"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0 and "--chat-model" in result.stdout
