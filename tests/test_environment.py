"""environment.yml (conda) and pyproject.toml (pip) list the same dependencies."""

import os
import subprocess
import sys
import tomllib

import yaml

from tests.helpers import REPO


def test_environment_yml_agrees_with_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert set(pip_section) == wanted
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python"))
    assert python == "python=3.11" and project["requires-python"] == ">=3.11"


def test_analysis_tools_run_from_any_folder_without_path_edits(tmp_path):
    """`make venv` installs engine, models, data and analysis (editable), so a tool started as
    a file from another folder imports them with no sys.path edit of its own."""
    for tool in sorted((REPO / "analysis").glob("*.py")):
        assert "sys.path" not in tool.read_text(), f"{tool.name} edits sys.path"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "analysis" / "results.py"), "--help"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]  # imports engine.evaluate at the top
    assert "--normalize" in proc.stdout
