"""DESIGN.md's import direction, walked over every module's imports (top level and lazy)."""

import ast
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "jaxrec"

# Low to high; a part may import its own modules and parts of strictly lower rank.
RANK = {
    "config": 0, "hardware": 0,
    "ppo": 1, "data": 1, "sim": 1, "models": 1,
    "generation": 2, "codec": 2,
    "rollout": 3, "eval": 3, "checkpoint": 3,
    "train": 4,
    "bench": 5,  # benchmarks: may time everything below, used by the CLI
    "cli": 6, "__main__": 7,
}
# Third-party packages that only one part may import.
ONLY = {"orbax": {"checkpoint"}, "tensorflow_datasets": {"data"}, "tensorflow": {"data"}}
NO_JAX_PARTS = {"data"}  # host-side readers: numpy only
# The PPO math imports jax and flax.struct only (plus the standard library).
PPO_ALLOWED = {"jax", "flax.struct", "__future__", "dataclasses", "functools", "math", "typing"}


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        part = rel.parts[0].removesuffix(".py")
        yield path, part


def _imports(path):
    """(module name, is_top_level) for every import in a file."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(n) for n in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in top
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from flax import struct` -> flax.struct
                yield f"{node.module}.{alias.name}", id(node) in top


def test_every_part_has_a_rank():
    for _, part in _modules():
        assert part == "__init__" or part in RANK, f"jaxrec/{part} has no rank in DESIGN.md's order"


@pytest.mark.parametrize("path, part", list(_modules()), ids=lambda x: str(x))
def test_import_direction(path, part):
    if part == "__init__":
        return  # the package root only resolves names lazily
    for name, top_level in _imports(path):
        root, *rest = name.split(".")
        if root == "jaxrec":
            if not rest:
                raise AssertionError(f"{path}: import the part, not the lazy package root")
            target = rest[0]
            assert target == part or RANK[target] < RANK[part], (
                f"{path} imports jaxrec.{target}: {part} (rank {RANK[part]}) may not import "
                f"{target} (rank {RANK[target]})"
            )
        if root in ONLY:
            assert part in ONLY[root], f"{path} imports {root}; only {ONLY[root]} may"
        if root in ("tensorflow_datasets", "tensorflow", "torch"):
            assert not top_level, f"{path} imports {root} at module level; import it lazily"
        if part == "ppo" and root != "jaxrec":
            allowed = root in ("jax", "__future__", "typing") or name.startswith("flax.struct")
            assert allowed or name in PPO_ALLOWED, f"{path}: jaxrec.ppo imports {name}"
        if part in NO_JAX_PARTS:
            assert root not in ("jax", "flax", "optax", "orbax", "chex"), (
                f"{path}: jaxrec.{part} must not import {root}"
            )


def test_importing_data_does_not_import_jax():
    code = "import sys, jaxrec, jaxrec.data; assert 'jax' not in sys.modules, 'jax imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names_resolve_lazily():
    code = (
        "import sys, jaxrec\n"
        "assert 'jaxrec.models' not in sys.modules\n"
        "m = jaxrec.models\n"
        "assert m.load_pretrained and m.save_pretrained and m.logits\n"
        "assert 'jaxrec.models' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
