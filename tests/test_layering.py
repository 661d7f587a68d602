"""The package's layering, as a contract: which part of longctx may import which.

Read bottom-up: `core` (positions, state helpers, dtypes, files) imports nothing of the package;
`ops` (kernels) only core; `attention` (backends) ops and core; `model` attention; `data` only
core; training and evaluation never import each other, and `jobs` composes them for the entry
points. Every import counts, including those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "longctx"
BASE = {"errors", "core"}

# part -> the parts it may import (besides itself).
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "core": {"errors"},
    "ops": BASE,
    "attention": BASE | {"ops"},
    "model": BASE | {"ops", "attention"},
    "flops": BASE | {"attention", "model"},
    "data": BASE,
    "checkpoints": BASE | {"model", "data"},
    "train": BASE | {"ops", "attention", "model", "data", "checkpoints", "flops"},
    "eval": BASE | {"ops", "attention", "model", "data", "checkpoints", "flops"},
    "bench": BASE | {"ops", "attention", "model", "data", "flops"},
    "pretrained": BASE | {"model", "data", "checkpoints"},
    "generation": BASE | {"pretrained"},
    "jobs": BASE | {"train", "eval", "data", "model", "checkpoints"},
    "__init__": {"core", "model", "checkpoints", "pretrained"},
}


def part_of(module: str) -> str:
    """longctx.attention.linear -> attention; longctx.jobs -> jobs; longctx -> __init__."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def module_name(path: Path) -> str:
    relative = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(relative.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> set[str]:
    """Every longctx module named by an import statement anywhere in the file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return {name for name in names if name == "longctx" or name.startswith("longctx.")}


def package_graph() -> dict[str, set[str]]:
    """module -> the longctx modules it imports, over the whole package."""
    return {module_name(path): imported_modules(path) for path in PACKAGE.rglob("*.py")}


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Each import from one part into another that ALLOWED does not list (unknown parts too)."""
    found = []
    for module, imports in sorted(graph.items()):
        source = part_of(module)
        allowed = ALLOWED.get(source)
        for target in sorted(imports):
            target_part = part_of(target)
            if target_part == source:
                continue
            if allowed is None or target_part not in allowed:
                found.append(f"{module} imports {target} ({source} -> {target_part})")
    return found


def test_every_part_of_the_package_is_in_the_contract():
    parts = {part_of(module) for module in package_graph()}
    assert parts <= set(ALLOWED), f"add {sorted(parts - set(ALLOWED))} to ALLOWED"


def test_the_package_keeps_its_layering():
    assert violations(package_graph()) == []


def test_the_allowed_arrows_form_no_cycle():
    visiting, done = set(), set()

    def visit(part: str, path: tuple[str, ...]) -> None:
        assert part not in visiting, f"cycle: {' -> '.join(path + (part,))}"
        if part in done:
            return
        visiting.add(part)
        for target in ALLOWED[part]:
            visit(target, path + (part,))
        visiting.discard(part)
        done.add(part)

    for part in ALLOWED:
        visit(part, ())


def test_forbidden_arrows_are_caught():
    """The checker itself: each arrow the design forbids is reported on a synthetic graph."""
    forbidden = {
        "longctx.attention.linear": {"longctx.model.lm"},
        "longctx.attention.full": {"longctx.train.module"},
        "longctx.model.lm": {"longctx.data.packing"},
        "longctx.data.corpus": {"longctx.attention.base"},
        "longctx.train.run": {"longctx.eval.run"},
        "longctx.eval.streaming": {"longctx.train.callbacks"},
        "longctx.core.state": {"longctx.model"},
        "longctx.newpart.thing": {"longctx.core.files"},
    }
    assert len(violations(forbidden)) == len(forbidden)
    allowed = {"longctx.model.lm": {"longctx.attention.base", "longctx.core.state"}}
    assert violations(allowed) == []
