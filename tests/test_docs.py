"""The README and docs/ stay true to the tree: every relative link resolves, every command names code that exists.

A page that links a moved file, or a command block that runs a module that was renamed, is what a new
user meets first; these tests fail on either.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```[a-z]*\n(.*?)^```", re.M | re.S)
_MODULE = re.compile(r"python3?\s+-m\s+([A-Za-z_][\w.]*)")
_SCRIPT = re.compile(r"(?<![\w/.])((?:benchmarks|jobs/configs|cluster)/[\w./-]+\.(?:py|yaml))")


def relative_links(text: str) -> list[str]:
    """Link targets that point into the repository (not URLs, not bare anchors), without their anchor."""
    targets = (m.group(1) for m in _LINK.finditer(text))
    return [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and not t.startswith("#")]


def command_blocks(text: str) -> list[str]:
    return [m.group(1) for m in _FENCE.finditer(text)]


def test_pages_exist():
    names = {p.name for p in PAGES}
    assert "README.md" in names and len(PAGES) > 5, names


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_relative_links_resolve(page: Path):
    missing = [t for t in relative_links(page.read_text()) if not (page.parent / t).exists()]
    assert not missing, f"{page.relative_to(REPO)} links to missing files: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_command_modules_exist(page: Path):
    blocks = command_blocks(page.read_text())
    # "jobs.$stage" stops at the shell variable: a name that ends in a dot is a pattern, not a module.
    modules = sorted({m for block in blocks for m in _MODULE.findall(block) if not m.endswith(".")})
    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    assert not missing, f"{page.relative_to(REPO)} runs modules that do not exist: {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(REPO).as_posix())
def test_named_scripts_and_configs_exist(page: Path):
    paths = sorted(set(_SCRIPT.findall(page.read_text())))
    missing = [p for p in paths if not (REPO / p).exists()]
    assert not missing, f"{page.relative_to(REPO)} names files that do not exist: {missing}"


def test_readme_is_short():
    lines = (REPO / "README.md").read_text().count("\n")
    assert lines <= 160, f"README.md has {lines} lines; move detail into docs/"


def test_the_checks_catch_what_they_look_for():
    """The parsers find a broken link and a missing module in a page made for the purpose."""
    page = "see [gone](docs/nowhere.md) and [web](https://example.org) and [here](#top)\n" \
           "```bash\npython -m jobs.no_such_stage --config x\n.venv/bin/python -m jobs.sft\n```\n"
    assert relative_links(page) == ["docs/nowhere.md"]
    modules = _MODULE.findall(command_blocks(page)[0])
    assert modules == ["jobs.no_such_stage", "jobs.sft"]
    assert importlib.util.find_spec("jobs.no_such_stage") is None
    assert importlib.util.find_spec("jobs.sft") is not None
