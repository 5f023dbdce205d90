"""The package's layering (docs/design.md): each module imports only modules of lower layers, the options module
imports nothing of the project, and nothing outside the package edits sys.path to reach it."""

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "rag_end2end"
# Bottom to top. A module may import modules of lower layers only; a new module gets a place here.
LAYERS = [
    ["options", "precision", "model.settings", "files"],  # leaves: they import nothing of the project
    [
        "data.readers",
        "evaluation.metrics",
        "evaluation.results_table",
        "training.plots",
        "pretrained",
        "tiny_models",
        "model.marginals",
        "model.lora",
        "model.encoders",
        "kb.faiss_devices",
        "kb.passages",
        "kb.similarity",
        "kb.ray_start",
        "kb.parts",
    ],
    ["kb.index", "kb.encoding", "kb.refresh_policy", "model.causal", "data.qa_dataset"],
    ["kb.versions", "data.mixing"],
    ["kb.search", "kb.build", "kb.refresh", "data.squad", "data.reconstruction", "training.run_dir"],
    ["kb.actors", "kb.staleness", "model.rag", "data.cmu_qa", "data.generate_qa", "data.qa_table", "data.wikiqa"],
    [
        "kb.retriever",
        "model.assembly",
        "recipes",
        "deploy.export",
        "deploy.answer",
        "deploy.langchain",
        "evaluation.evaluate",
    ],
    ["training.callbacks", "training.arguments"],
    ["training.finetune"],
    ["api"],
]
LAYER = {module: rank for rank, layer in enumerate(LAYERS) for module in layer}


def package_modules() -> list[str]:
    return sorted(
        ".".join(path.relative_to(PACKAGE).with_suffix("").parts)
        for path in PACKAGE.rglob("*.py")
        if path.name != "__init__.py"
    )


def imported_modules(module: str) -> set[str]:
    """The package modules `module` imports, at its top or inside a function (a lazy import is an import too)."""
    tree = ast.parse((PACKAGE / (module.replace(".", "/") + ".py")).read_text())
    found = set()
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "rag_end2end":
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            inner = name.removeprefix("rag_end2end.")
            if inner in LAYER or (PACKAGE / (inner.replace(".", "/") + ".py")).is_file():
                found.add(inner)
    return found


def test_every_module_has_a_layer():
    assert [m for m in package_modules() if m not in LAYER] == []
    assert [m for m in LAYER if m not in package_modules()] == []


@pytest.mark.parametrize("module", package_modules())
def test_imports_only_go_down(module):
    upward = sorted(m for m in imported_modules(module) if LAYER.get(m, -1) >= LAYER[module])
    assert upward == [], f"{module} (layer {LAYER[module]}) imports {upward} of its own layer or above"


def test_the_options_module_imports_nothing_of_the_project():
    assert imported_modules("options") == set()


def test_no_sys_path_edits_or_e402_waivers_outside_the_package():
    offenders = []
    for folder in ("bench", "experiments", "tests", "test_run", "tools", "data_prep"):
        for path in (REPO / folder).rglob("*.py"):
            text = path.read_text()
            if re.search(r"sys\.path\.(insert|append)|noqa: E402|spec_from_file_location", text):
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == [str(Path(__file__).relative_to(REPO))]  # this file names the patterns


def test_the_options_name_every_recipe_the_recipes_module_defines():
    """The options module lists the recipes' names (it imports nothing); the list and the recipes agree."""
    from rag_end2end.options import RECIPES
    from rag_end2end.recipes import MODES

    assert tuple(MODES) == RECIPES
