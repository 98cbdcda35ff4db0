"""The package's layers, checked on its import graph (parsed with ast: nothing is imported).

Every ``import`` and ``from ... import`` in platform/cfgd counts, at module level and
inside functions alike: a lazy import still ties two layers together.
"""

import ast
from collections import Counter
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "platform" / "cfgd"
MAX_LINES = 450


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from a import b`` gives a and a.b)."""
    tree = ast.parse(path.read_text(), str(path))
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{alias.name}" for alias in node.names)
    return found


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
GRAPH = {name: _imports(path) for name, path in MODULES.items()}


def _hits(module: str, forbidden: tuple[str, ...]) -> list[str]:
    return sorted(i for i in GRAPH[module] if any(i == f or i.startswith(f + ".") for f in forbidden))


def _layer(prefix: str) -> list[str]:
    return [m for m in MODULES if m == prefix or m.startswith(prefix + ".")]


def test_the_graph_is_parsed():
    assert "cfgd.data.shards" in MODULES and "cfgd.io.storage" in GRAPH["cfgd.io.transfers"]


@pytest.mark.parametrize("module", _layer("cfgd.data") + _layer("cfgd.diffusion"))
def test_data_and_diffusion_know_nothing_of_ray_serving_the_model_or_training(module):
    assert not _hits(module, ("ray", "cfgd.serving", "cfgd.model", "cfgd.train")), module


@pytest.mark.parametrize("module", _layer("cfgd.io"))
def test_io_knows_nothing_of_the_model(module):
    assert not _hits(module, ("cfgd.model",)), module


@pytest.mark.parametrize("module", list(MODULES))
def test_the_package_never_imports_its_entry_points_or_tests(module):
    assert not _hits(module, ("jobs", "serve", "bench", "tests", "conftest")), module


def test_no_two_modules_share_a_file_stem():
    stems = Counter(p.stem for p in MODULES.values() if p.stem != "__init__")
    assert not [s for s, n in stems.items() if n > 1], stems


@pytest.mark.parametrize("module", list(MODULES))
def test_no_module_is_too_long(module):
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{module}: {lines} lines (at most {MAX_LINES})"


def test_every_layer_says_what_it_is():
    for init in PACKAGE.rglob("__init__.py"):
        if init.parent == PACKAGE:
            continue
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc) > 80, f"{init} needs a docstring saying what the layer is"


def test_no_test_file_imports_another_test_file():
    """Shared fixtures live in conftest.py, shared builders in helper modules (tests/builders.py)."""
    tests = Path(__file__).resolve().parent
    def imported(path):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                yield from (alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and not node.level:
                yield node.module or ""

    crossing = {p.name: sorted(i for i in imported(p) if i.split(".")[0].startswith("test_"))
                for p in sorted(tests.glob("test_*.py"))}
    assert {name: hits for name, hits in crossing.items() if hits} == {}


def test_parquet_is_never_read_as_a_dataset_over_a_python_file_object():
    """pq.read_table over a Python file (fsspec's, io.BytesIO) builds an Arrow dataset whose
    fragments are released on Arrow's own threads; one released while the interpreter exits
    takes the GIL, is killed, and aborts the process ("terminate called without an active
    exception", exit 134: 10 of 60 prepare_data runs on a loaded 2-core machine). Read a
    file object with pq.ParquetFile(f).read(), bytes with pa.BufferReader."""
    bad = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "read_table"
                    and node.args and not (isinstance(node.args[0], ast.Call)
                                           and getattr(node.args[0].func, "attr", "") == "BufferReader")):
                bad.append(f"{name}:{node.lineno}")
    assert bad == []
