"""The project's data flow, as imports: extract/ -> tasks/ -> model/, with common/ a leaf under them all, and
inside tasks/ the roles: the engine knows no task, the data code knows no engine, nothing imports pipelines/.

Every ``.py`` file of ``extract/``, ``model/``, ``common/``, ``tasks/`` and ``pipelines/`` is parsed (never
imported) and each import statement, at any depth (inside functions too), is checked against :data:`FORBIDDEN`:
a file is ruled by the longest package prefix of its module name that has a rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("extract", "model", "common", "tasks", "pipelines")
#: the tasks that use the engine, and the applications above them
_TASK_ROLES = ("tasks.pretrain", "tasks.finetune", "tasks.answer", "tasks.serve", "tasks.registry", "tasks.cli")
#: package (dotted prefix) -> the modules (dotted prefixes) it must never import
FORBIDDEN: dict[str, frozenset[str]] = {
    "extract": frozenset({"model", "tasks", "pipelines"}),
    "model": frozenset({"extract", "tasks", "pipelines"}),
    "common": frozenset({"extract", "model", "tasks", "pipelines"}),
    "tasks": frozenset({"pipelines"}),
    "tasks.engine": frozenset({"pipelines", *_TASK_ROLES, "tasks.convert", "tasks.metrics"}),
    "tasks.data": frozenset({"pipelines", "tasks.engine", *_TASK_ROLES}),
    "tasks.metrics": frozenset({"pipelines", "tasks.engine", *_TASK_ROLES}),
    "tasks.convert": frozenset({"pipelines", "tasks.engine", *_TASK_ROLES}),
    "tasks.pretrain": frozenset(
        {"pipelines", "tasks.finetune", "tasks.answer", "tasks.registry", "tasks.cli"}
    ),
    "tasks.finetune": frozenset(
        {"pipelines", "tasks.pretrain", "tasks.answer", "tasks.registry", "tasks.cli"}
    ),
    "pipelines": frozenset(),
}


def _rule(module: list[str]) -> str:
    """The longest prefix of ``module`` that has a rule."""
    for n in range(len(module), 0, -1):
        key = ".".join(module[:n])
        if key in FORBIDDEN:
            return key
    return module[0]


def _matches(name: str, prefixes: frozenset[str]) -> str | None:
    return next((p for p in sorted(prefixes) if name == p or name.startswith(p + ".")), None)


def _module_name(path: Path, root: Path) -> list[str]:
    """``extract/store/reader.py`` -> ``["extract", "store", "reader"]`` (``__init__`` -> the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return parts[:-1] if parts[-1] == "__init__" else parts


def _imported(path: Path, root: Path, tree: ast.AST) -> list[tuple[int, str]]:
    """``(line, absolute module name)`` of every import in ``tree`` (relative imports resolved)."""
    module = _module_name(path, root)
    package = module if path.name == "__init__.py" else module[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if not node.level:
                found.append((node.lineno, node.module or ""))
                continue
            base = package[: len(package) - (node.level - 1)]
            if node.module:
                found.append((node.lineno, ".".join([*base, node.module])))
            else:  # `from .. import name`: each name is a module (or an attribute of the package)
                found.extend((node.lineno, ".".join([*base, alias.name])) for alias in node.names)
    return found


def layout_violations(root: Path = ROOT) -> list[str]:
    """``"path:line: <package> imports <module> ..."`` for every import against the data flow."""
    problems = []
    for package in PACKAGES:
        if not (root / package).is_dir():
            continue
        for path in sorted((root / package).rglob("*.py")):
            rule = _rule(_module_name(path, root))
            tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
            for line, name in _imported(path, root, tree):
                if _matches(name, FORBIDDEN[rule]):
                    where = rule.replace(".", "/") + "/"
                    problems.append(
                        f"{path.relative_to(root)}:{line}: {where} imports {name} "
                        f"({where} must not import {', '.join(sorted(FORBIDDEN[rule]))})"
                    )
    return problems


def test_imports_follow_the_data_flow() -> None:
    problems = layout_violations()
    assert not problems, "imports against the data flow:\n" + "\n".join(problems)


@pytest.mark.parametrize(
    ("rel", "source", "bad"),
    [
        (
            "extract/x.py",
            "def f():\n    from model.modeling import LxmertModel\n",
            "extract/x.py:2: extract/ imports model.modeling",
        ),
        (
            "model/x.py",
            "import tasks.engine.trainer as t\n",
            "model/x.py:1: model/ imports tasks.engine.trainer",
        ),
        ("common/sub/x.py", "from ...extract import store\n", "common/sub/x.py:1: common/ imports extract"),
        ("extract/sub/x.py", "from ... import model\n", "extract/sub/x.py:1: extract/ imports model"),
        ("tasks/x.py", "from .. import model\n", None),
        (
            "tasks/engine/x.py",
            "from tasks.finetune.qa import QATask\n",
            "tasks/engine/x.py:1: tasks/engine/ imports",
        ),
        ("tasks/engine/x.py", "from tasks.data.regions import Regions\n", None),
        (
            "tasks/data/x.py",
            "from ..engine import trainer\n",
            "tasks/data/x.py:1: tasks/data/ imports tasks.engine",
        ),
        (
            "tasks/finetune/x.py",
            "import pipelines.full_run\n",
            "tasks/finetune/x.py:1: tasks/finetune/ imports",
        ),
        ("pipelines/x.py", "from tasks.cli import main\n", None),
        ("tasks/x.py", "from extract.store import FeatureStore\nfrom model import LxmertModel\n", None),
        ("extract/x.py", "from common.config import load_config\nfrom .records import Record\n", None),
    ],
)
def test_the_check_names_file_and_line(tmp_path: Path, rel: str, source: str, bad: str | None) -> None:
    for package in PACKAGES:
        (tmp_path / package).mkdir()
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    problems = layout_violations(tmp_path)
    if bad is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problems[0].startswith(bad), problems
