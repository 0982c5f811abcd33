"""The project's own promises: environment.yml in step with pyproject.toml, CI runs the README's
test command, the README's commands exist."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[]", requirement.strip(), maxsplit=1)[0].lower()


def test_environment_yml_lists_the_same_dependencies_as_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = {r.replace(" ", "") for r in project["dependencies"]}
    wanted |= {r.replace(" ", "") for r in project["optional-dependencies"]["test"]}
    listed = set()
    section = None
    for line in (ROOT / "environment.yml").read_text().splitlines():
        if line and not line.startswith((" ", "#")):
            section = line.split(":", 1)[0]
        item = line.strip()
        if section != "dependencies" or not item.startswith("- ") or item.endswith(":"):
            continue
        item = item[2:].strip()
        if _name(item) in {"python", "pip", "-e"} or item.startswith("-e"):
            continue
        listed.add(item.replace(" ", ""))
    assert listed == wanted


def test_ci_runs_the_readmes_test_command():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash scripts/test.sh" in readme and "bash scripts/demo.sh" in readme
    commands = [line for line in ci.splitlines() if line.strip() and not line.startswith("#")]
    assert commands[-1].strip() == "bash scripts/test.sh"
    assert (ROOT / "scripts" / "test.sh").exists() and (ROOT / "scripts" / "demo.sh").exists()


def test_generated_reports_are_not_committed():
    ignored = (ROOT / ".gitignore").read_text().splitlines()
    assert "reports/*" in ignored and ".venv/" in ignored
