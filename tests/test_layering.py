"""The house rules of the layout: stages never import ray; cluster never imports model libraries."""

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def imported_modules(package: str) -> dict[str, set[str]]:
    found = {}
    for path in (ROOT / package).rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize("package, forbidden", [("stages", {"ray"}), ("cluster", {"diffusers", "transformers"})])
def test_layer_does_not_import(package, forbidden):
    offenders = {f: names & forbidden for f, names in imported_modules(package).items() if names & forbidden}
    assert offenders == {}
    assert imported_modules(package)  # the scan did read files


def test_serve_app_is_http_in_and_cluster_calls_out():
    """serve_app.py speaks HTTP and calls cluster/: no model libraries, no stage but its errors."""
    names, stages = set(), set()
    for node in ast.walk(ast.parse((ROOT / "serve_app.py").read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
            if node.module.startswith("stages"):
                stages.add(node.module)
    assert names & {"torch", "diffusers", "transformers"} == set()
    assert stages == {"stages.errors"}
    assert "cluster" in names


def test_cluster_imports_no_top_level_module():
    """cluster/ is below serve_app.py (and tools/, bench/): it reaches the HTTP app only by the
    import path in configs/serve, as Serve does."""
    above = {p.stem for p in ROOT.glob("*.py")} | {"tools", "bench", "tests"}
    assert "serve_app" in above  # the scan knows what lies above
    offenders = {f: names & above for f, names in imported_modules("cluster").items() if names & above}
    assert offenders == {}


# -- model families live in their adapters -------------------------------------------------------

FAMILY_MODULES = ROOT / "stages" / "families"
# A family's name or a family-only attribute, as code would spell it.
FAMILY_WORDS = re.compile(r"cogvideo|z[-_]?image|i2vgen|ofs_|patch_size_t", re.IGNORECASE)


def code_without_prose(path: Path) -> str:
    """The module's code as Python reads it: no comments, no docstrings (prose may name a family
    as an example; code may not branch on one)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr):
            if isinstance(body[0].value, ast.Constant) and isinstance(body[0].value.value, str):
                body[0] = ast.Pass()
    return ast.unparse(tree)


def shared_modules() -> list[Path]:
    """Every framework module but the family adapters: stages/ (the families' shared base and
    registry included), cluster/ and serve_app.py."""
    adapters = {p for p in FAMILY_MODULES.glob("*.py") if p.stem not in ("__init__", "base")}
    modules = [*(ROOT / "stages").rglob("*.py"), *(ROOT / "cluster").rglob("*.py"), ROOT / "serve_app.py"]
    return [p for p in modules if p not in adapters]


def test_no_module_outside_the_family_adapters_names_a_family():
    offenders = {}
    for path in shared_modules():
        found = sorted({m.group(0).lower() for m in FAMILY_WORDS.finditer(code_without_prose(path))})
        if found:
            offenders[str(path.relative_to(ROOT))] = found
    assert offenders == {}
    # the check sees what it is looking for: an adapter names its family, prose is skipped
    assert FAMILY_WORDS.search(code_without_prose(FAMILY_MODULES / "cogvideox.py"))
    assert not FAMILY_WORDS.search(code_without_prose(ROOT / "stages" / "context_parallel.py"))
    assert FAMILY_WORDS.search((ROOT / "stages" / "context_parallel.py").read_text())


# -- no import cycles ----------------------------------------------------------------------------


def project_import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports, anywhere in it: a function-level import
    or one under `if TYPE_CHECKING:` closes a cycle of design as much as a top-level one.
    Importing `a.b.c` runs the packages `a` and `a.b` first, so they count too."""
    paths = [*(ROOT / "stages").rglob("*.py"), *(ROOT / "cluster").rglob("*.py"), ROOT / "serve_app.py"]

    def module_name(path: Path) -> str:
        parts = path.relative_to(ROOT).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {module_name(p): p for p in paths}

    def targets(name: str) -> set[str]:
        parts = name.split(".")
        return {".".join(parts[:i]) for i in range(1, len(parts) + 1)} & modules.keys()

    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    found |= targets(alias.name)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= targets(node.module)
                for alias in node.names:  # `from pkg import module`
                    found |= targets(f"{node.module}.{alias.name}")
        graph[name] = found - {name}
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for target in graph.get(node, ()):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return cycles


def test_no_import_cycles():
    graph = project_import_graph()
    assert import_cycles(graph) == []
    # the check finds a cycle where there is one, and reads function-level imports
    assert import_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert "stages.weights" in graph["cluster.driver"] and "stages.families" in graph["stages.families.cogvideox"]


def test_checking_a_request_loads_no_diffusers(tiny_weights):
    """The driver (a CLI, a Serve ingress) checks requests and loads only the tokenizer: importing
    diffusers (and DeepSpeed through it) would cost each such process seconds of CPU for nothing.
    In a fresh interpreter, as a driver starts."""
    import subprocess
    import sys

    probe = (
        "import sys\n"
        "from cluster.driver import prepare_jobs\n"
        "jobs = prepare_jobs('tiny', ['a cat'], ulysses=2)\n"
        "assert jobs[0].request.prompt == 'a cat' and jobs[0].layout.world_size == 2\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'diffusers', 'deepspeed', 'transformers'}))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["['transformers']"]  # the tokenizer's library only
