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


PACKAGE = ROOT / "scr_nb"


def _product_modules() -> list[Path]:
    return [p for p in PACKAGE.rglob("*.py") if "sim" not in p.relative_to(PACKAGE).parts]


def test_the_readmes_python_api_lists_exactly_what_scr_nb_exports():
    import scr_nb

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([A-Za-z_]+)`", section, flags=re.M))
    assert listed == set(scr_nb.__all__)
    for name in scr_nb.__all__:
        assert getattr(scr_nb, name) is not None


def test_every_sql_statement_lives_in_the_store():
    statement = re.compile(r"""["'](SELECT|INSERT|UPDATE|DELETE|CREATE|PRAGMA|BEGIN)\b""")
    outside = [str(p.relative_to(ROOT)) for p in _product_modules()
               if "store" not in p.relative_to(PACKAGE).parts
               and (statement.search(p.read_text()) or "import sqlite3" in p.read_text())]
    assert outside == []


def test_the_product_never_imports_the_simulator():
    """Only the CLI's commands that start the simulator, synth or the demo may import scr_nb.sim,
    and only inside those commands."""
    top_level = re.compile(r"^(from|import) scr_nb\.sim\b", re.M)
    anywhere = re.compile(r"^\s*(from|import) scr_nb\.sim\b", re.M)
    for path in _product_modules():
        text = path.read_text()
        if "cli" in path.name:
            assert not top_level.search(text), path
        else:
            assert not anywhere.search(text), path


def test_every_subpackage_says_what_its_step_does():
    for init in PACKAGE.glob("*/__init__.py"):
        doc = init.read_text().split('"""')[1].strip()
        assert len(doc.splitlines()) == 2, init
