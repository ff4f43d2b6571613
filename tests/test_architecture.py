"""The module structure: no import cycle, no upward import, the simulator kept apart.

Every ``import`` of every module of ``readout_cy``, ``iris_tasks``, ``iris_devstack``,
``plugins`` and ``dags`` -- at module level or inside a function alike, since a lazy import
is still a dependency -- is read from the source (nothing is imported). Modules are grouped
into the layers of the README's layout table; an import may only point to the same layer or a
lower one, and the module graph must have no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("readout_cy", "iris_tasks", "iris_devstack", "plugins", "dags")
OURS = ("readout_cy", "iris_tasks", "iris_devstack", "iris_ops")

# Layer of each group (the longest matching prefix wins); arrows point down the README table.
LAYERS = {
    "readout_cy": 0,
    "iris_tasks": 0,  # the package's own __init__
    "iris_tasks.errors": 0,
    "iris_tasks.config": 0,  # settings from the environment; imports nothing of the project
    "iris_tasks.datamodels": 1,
    "iris_tasks.instrument": 1,  # the optical design and published line lists: data, no fitting
    "iris_tasks.rawcheck": 1,
    "iris_tasks.storage": 1,
    "iris_tasks.metadata": 2,
    "iris_tasks.calib": 2,
    "iris_tasks.quicklook": 2,
    "iris_tasks.simulate": 3,
    "iris_tasks.steps": 3,
    "iris_tasks.ifs": 4,
    "iris_tasks.masters": 5,
    "iris_tasks.pipelines": 6,
    "iris_tasks.orchestration.context": 6,  # imports nothing of the project; read from below
    "iris_tasks.orchestration": 7,
    "iris_tasks.lineage": 7,
    "iris_tasks.cli": 7,
    "iris_tasks.cli_info": 7,
    # Command-line adapters live beside their package but sit on top, like the CLI itself.
    "iris_tasks.pipelines.cli": 7,
    "iris_tasks.calib.cli": 7,
    "iris_tasks.calib.__main__": 7,
    "iris_tasks.simulate.cli": 7,
    "iris_ops": 8,
    "plugins": 8,
    "dags": 8,
    "iris_devstack": 9,
}
# The reduction must not share the simulator's code (tests would then prove only round-off).
REDUCTION = ("readout_cy", "iris_tasks.steps", "iris_tasks.ifs", "iris_tasks.masters",
             "iris_tasks.pipelines", "iris_tasks.calib", "iris_tasks.datamodels",
             "iris_tasks.metadata", "iris_tasks.rawcheck", "iris_tasks.orchestration")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] == "plugins" and len(parts) > 1 and parts[1] == "iris_ops":
        parts = parts[1:]  # the plugins folder is on Airflow's path: iris_ops is top level
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, module: str) -> set[str]:
    is_pkg = path.name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    out: set[str] = set()
    tree = ast.parse(path.read_text(), str(path))
    type_only = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
                 and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")
                 for n in ast.walk(node)}  # annotations only: no dependency at run time
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            out.add(target)
            out.update(f"{target}.{a.name}" for a in node.names)  # `from pkg import submodule`
    return {t for t in out if t.split(".")[0] in OURS}


def _graph() -> dict[str, set[str]]:
    files = {}
    for pkg in PACKAGES:
        base = ROOT / pkg
        if base.is_dir():
            for path in base.rglob("*.py"):
                files[_module_name(path)] = path
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps = set()
        for target in _imports(path, name):
            # Resolve to the longest known module (``from x import name`` names may be
            # attributes, not modules).
            while target and target not in files:
                target = target.rpartition(".")[0]
            if target and target != name:
                deps.add(target)
        graph[name] = deps
    return graph


def _layer(module: str) -> int:
    best = max((p for p in LAYERS if module == p or module.startswith(p + ".")), key=len)
    return LAYERS[best]


def test_every_module_has_a_layer():
    unknown = [m for m in _graph() if not any(m == p or m.startswith(p + ".") for p in LAYERS)]
    assert unknown == []


def test_no_upward_import():
    upward = sorted(f"{a} (layer {_layer(a)}) imports {b} (layer {_layer(b)})"
                    for a, deps in _graph().items() for b in deps
                    if _layer(b) > _layer(a) and not _is_package_init_of(b, a))
    assert upward == [], "\n".join(upward)


def _is_package_init_of(package: str, module: str) -> bool:
    """Importing ``a.b.c`` executes ``a/__init__`` and ``a/b/__init__``: not a dependency."""
    return module.startswith(package + ".")


def test_no_import_cycle():
    graph = _graph()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if _is_package_init_of(w, v):
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert cycles == [], cycles


def test_reduction_never_imports_the_simulator():
    bad = sorted(f"{a} imports {b}" for a, deps in _graph().items() for b in deps
                 if a.startswith(REDUCTION) and b.startswith("iris_tasks.simulate"))
    assert bad == []


def test_the_dev_stack_is_imported_by_nothing_it_serves():
    bad = sorted(f"{a} imports {b}" for a, deps in _graph().items() for b in deps
                 if b.startswith("iris_devstack") and not a.startswith("iris_devstack"))
    assert bad == []
