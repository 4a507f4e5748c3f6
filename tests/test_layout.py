"""The package's shape: public import paths, folders that import only downwards, no cycles."""

from __future__ import annotations

import ast
import importlib
import pathlib
import subprocess
import sys

import pytest

import certdistill
from certdistill._moved import MOVED

PACKAGE = pathlib.Path(certdistill.__file__).parent

#: Each folder (or top-level module) and its floor: a module may import its own folder and any
#: lower floor, never a higher one or a sibling on its own floor.
FLOORS = {
    "certdistill._version": 0,
    "certdistill.exceptions": 0,
    "certdistill.datasets": 0,
    "certdistill.bounds": 1,
    "certdistill.io": 2,
    "certdistill.verify": 2,
    "certdistill.certification": 3,
    "certdistill.scale": 4,
    "certdistill.estimators": 5,
    "certdistill.plotting": 6,
    "certdistill.cli": 7,
    "certdistill._moved": 0,
    "certdistill.__main__": 8,
    "certdistill": 8,
}


def _module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _home(module: str) -> str:
    """The folder (or top-level module) of ``module`` that FLOORS names."""
    parts = module.split(".")
    for depth in range(len(parts), 0, -1):
        name = ".".join(parts[:depth])
        if name in FLOORS:
            return name
    raise AssertionError(f"{module} lies in no folder of FLOORS: add it there.")


def _imports(path: pathlib.Path) -> list[tuple[str, str, int]]:
    """(imported module, imported name or "", line) of every certdistill import, lazy ones too."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and (node.module.split(".")[0] == "certdistill")
        ):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                if submodule in MODULES:
                    found.append((submodule, "", node.lineno))
                else:
                    found.append((node.module, alias.name, node.lineno))
        elif isinstance(node, ast.Import):
            found += [
                (alias.name, "", node.lineno)
                for alias in node.names
                if alias.name.split(".")[0] == "certdistill"
            ]
    return found


def test_every_module_has_a_floor():
    for module in MODULES:
        _home(module)


def test_no_module_imports_upwards_or_sideways():
    wrong = []
    for module, path in MODULES.items():
        home = _home(module)
        for target, _, line in _imports(path):
            there = _home(target)
            if there != home and FLOORS[there] >= FLOORS[home]:
                wrong.append(
                    f"{path.name}:{line} ({home}, floor {FLOORS[home]}) imports "
                    f"{target} ({there}, floor {FLOORS[there]})"
                )
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    graph = {
        module: {target for target, _, _ in _imports(path) if target in MODULES}
        for module, path in MODULES.items()
    }
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, stack: list[str]) -> None:
        state[module] = 1
        stack.append(module)
        for target in graph[module]:
            if state.get(target) == 1:
                cycles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif target not in state:
                visit(target, stack)
        stack.pop()
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [])
    assert not cycles, "\n".join(cycles)


def test_no_private_names_across_modules():
    private = [
        f"{path.name}:{line} takes {name} from {target}"
        for module, path in MODULES.items()
        for target, name, line in _imports(path)
        if name.startswith("_") and name != "__version__" and target != module
    ]
    assert not private, "\n".join(private)


def test_nothing_imports_the_package_root():
    root_imports = [
        f"{path.name}:{line} imports {name or 'certdistill'}"
        for module, path in MODULES.items()
        if module != "certdistill"
        for target, name, line in _imports(path)
        if target == "certdistill" and name not in ("_moved", "_version")
    ]
    assert not root_imports, "\n".join(root_imports)


@pytest.mark.parametrize("name", certdistill.__all__)
def test_public_names_import_from_the_root(name):
    assert getattr(certdistill, name) is not None


@pytest.mark.parametrize("old", sorted(MOVED))
def test_old_module_paths_still_import(old):
    new = importlib.import_module(MOVED[old])
    assert importlib.import_module(old) is new
    assert sys.modules[old] is new
    assert new.__spec__.name == MOVED[old]


def test_old_paths_of_the_public_names():
    from certdistill.certify import Certificate, certified_radius, certify
    from certdistill.persistence import load, save
    from certdistill.scoring import CertifiedAccuracy
    from certdistill.student import DistilledStudent
    from certdistill.teacher import CertifiedTeacher

    assert (
        Certificate,
        certified_radius,
        certify,
        load,
        save,
        CertifiedAccuracy,
        DistilledStudent,
        CertifiedTeacher,
    ) == (
        certdistill.Certificate,
        certdistill.certified_radius,
        certdistill.certify,
        certdistill.load,
        certdistill.save,
        certdistill.CertifiedAccuracy,
        certdistill.DistilledStudent,
        certdistill.CertifiedTeacher,
    )
    # The root's ``certify`` stays the function after the old module path is imported.
    assert callable(certdistill.certify) and not isinstance(certdistill.certify, type(certdistill))


def test_old_paths_in_a_fresh_interpreter():
    # In a fresh process no moved module is imported yet: the finder, not the registry, answers.
    code = (
        "import certdistill.distributed as d, certdistill.teacher_outputs as t, certdistill; "
        "assert d.__name__ == 'certdistill.scale.distributed'; "
        "assert t.__name__ == 'certdistill.estimators.teacher_outputs'; "
        "from certdistill.certify import certify; assert certify is certdistill.certify"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _code_lines(node: ast.AST, source: list[str]) -> int:
    """Lines of ``node`` that are neither blank, comments nor docstrings."""
    docstrings = set()
    for inner in ast.walk(node):
        if isinstance(inner, ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and inner.body:
            first = inner.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                if isinstance(first.value.value, str):
                    docstrings.update(range(first.lineno, first.end_lineno + 1))
    return sum(
        1
        for number in range(node.lineno, node.end_lineno + 1)
        if number not in docstrings
        and source[number - 1].strip()
        and not source[number - 1].strip().startswith("#")
    )


#: Code lines (no docstrings, comments or blank lines) a class and a function may have at most.
MAX_CLASS_LINES = 300
MAX_FUNCTION_LINES = 60


def test_classes_and_functions_stay_small():
    too_long = []
    for module, path in MODULES.items():
        source = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(source))):
            if isinstance(node, ast.ClassDef):
                limit = MAX_CLASS_LINES
            elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                limit = MAX_FUNCTION_LINES
            else:
                continue
            lines = _code_lines(node, source)
            if lines > limit:
                too_long.append(f"{module}.{node.name}: {lines} code lines (at most {limit})")
    assert not too_long, "\n".join(too_long)
