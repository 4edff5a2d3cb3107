"""The house rules of the layout: stages never import ray; cluster never imports model libraries."""

import ast
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
