"""The package's imports run one way: config/storage/runtime <- run/embeddings/models <- data/train/analysis
<- stages <- pipeline <- cli, with no cycle, counting the imports inside functions too."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "olr_ray"

# Lowest first; a module may import its own layer and the layers below it.
LAYERS = [
    ("olr_ray", "olr_ray.config", "olr_ray.storage", "olr_ray.runtime"),
    ("olr_ray.run", "olr_ray.embeddings", "olr_ray.models", "olr_ray.trained"),
    ("olr_ray.data", "olr_ray.train", "olr_ray.analysis"),
    ("olr_ray.stages", "olr_ray.edit"),
    ("olr_ray.pipeline", "olr_ray.embed_job"),
    ("olr_ray.ablation",),
    ("olr_ray.cli",),
]


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _layer(module: str) -> int:
    best = None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (i, len(prefix))
    assert best is not None, f"{module} is in no layer of LAYERS"
    return best[0]


def _imports(path: pathlib.Path, modules: dict[str, pathlib.Path]) -> list[tuple[str, int, bool]]:
    """(imported olr_ray module, line, inside a function) for every import statement in the file."""
    tree = ast.parse(path.read_text())
    found = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            local = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, local) for a in child.names if a.name.split(".")[0] == "olr_ray")
            elif isinstance(child, ast.ImportFrom) and child.module and child.module.split(".")[0] == "olr_ray":
                for a in child.names:
                    sub = f"{child.module}.{a.name}"
                    found.append((sub if sub in modules else child.module, child.lineno, local))
            visit(child, local)

    visit(tree, False)
    return found


def test_imports_run_one_way_without_cycles():
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    upward, local = [], []
    for module, path in modules.items():
        for target, line, in_function in _imports(path, modules):
            graph[module].add(target)
            if _layer(target) > _layer(module):
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} {module} imports {target}")
            if in_function:
                local.append(f"{path.relative_to(PACKAGE.parent)}:{line} {module} imports {target} in a function")
    assert not upward, "imports from a higher layer:\n" + "\n".join(upward)
    assert not local, "the package's own modules are imported at the top of a module:\n" + "\n".join(local)
    state: dict[str, int] = {}

    def dfs(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            assert state.get(t) != 1, "import cycle: " + " -> ".join(stack[stack.index(t):] + [t])
            if t not in state:
                dfs(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m, [m])


def test_the_embeddings_reader_loads_neither_torch_nor_ray():
    code = "import sys, olr_ray.embeddings; print(sorted(m for m in ('torch', 'ray') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_stage_module_has_the_same_shape():
    from olr_ray import stages

    assert stages.STAGES == ("data", "classifier", "siamese", "embed", "decoder", "analysis")
    for i, stage in enumerate(stages.REGISTRY):
        assert callable(stage.run) and isinstance(stage.REQUIRES, tuple)
        # A stage reads only what runs before it.
        assert set(stage.REQUIRES) <= set(stages.STAGES[:i]), stage.NAME
