"""The library's layers, read from its source: which packages exist and who may import whom.

model ← data ← train / selfplay / judge / eval ← selection ← serve, with ``config`` and ``runs`` below all
of them (and ``log`` below those) and two commands above: ``score`` (the scorer) and ``convert`` (the checkpoint
converter). A module may import its own package, the packages of lower layers and the top-level
modules; within the middle layer only self-play may use the judge (its verdicts become preference
pairs), never the other way round.
"""

from __future__ import annotations

import ast
from pathlib import Path

import stmed

ROOT = Path(stmed.__file__).parent
TOP_LEVEL = {"__init__", "config", "log", "runs", "score", "convert"}
RANK = {"log": -1, "config": 0, "runs": 0, "model": 1, "data": 2, "privacy": 2.5, "train": 3, "selfplay": 3,
        "judge": 3, "eval": 3, "selection": 3.5, "serve": 4, "review": 4, "score": 5, "convert": 5}
SAME_LAYER_ALLOWED = {("selfplay", "judge")}


def _unit(module: str) -> str:
    """``stmed.data.images`` -> ``data``; ``stmed.config`` -> ``config``."""
    return module.split(".")[1]


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "stmed":
            if node.module == "stmed":
                found |= {f"stmed.{alias.name}" for alias in node.names}
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("stmed.")}
    return found


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(("stmed", *parts))] = path
    return out


def test_top_level_holds_only_the_shared_modules_and_packages():
    modules = {p.stem for p in ROOT.glob("*.py")}
    packages = {p.name for p in ROOT.iterdir() if (p / "__init__.py").exists()}
    assert modules == TOP_LEVEL
    assert packages == {"model", "data", "privacy", "train", "selfplay", "judge", "eval", "serve", "review",
                        "selection"}


def test_no_module_imports_a_higher_layer():
    wrong = []
    for name, path in _modules().items():
        if name == "stmed.__init__":
            continue
        here = _unit(name)
        for imported in _imports(path):
            there = _unit(imported)
            if there == here:
                continue
            higher = RANK[there] > RANK[here]
            sideways = RANK[there] == RANK[here] and (here, there) not in SAME_LAYER_ALLOWED
            if higher or sideways:
                wrong.append(f"{name} imports {imported}")
    assert not wrong, "\n".join(wrong)


def test_the_layer_check_sees_a_wrong_way_import(tmp_path: Path):
    bad = tmp_path / "m.py"
    bad.write_text("from stmed.data.synthetic import text_corpus\nfrom stmed import runs\n")
    assert _imports(bad) == {"stmed.data.synthetic", "stmed.runs"}
    assert RANK[_unit("stmed.data.synthetic")] > RANK[_unit("stmed.model.build")]
