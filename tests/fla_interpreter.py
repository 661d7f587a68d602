"""flash-linear-attention's Triton kernels on CPU tensors: Triton's interpreter in the test process.

With TRITON_INTERPRET=1 set before triton is imported (tests/conftest.py sets it), `triton.jit`
makes every kernel, fla's and triton's own library functions, an interpreted function that runs
each program instance with numpy on the tensors' host memory.
Two shims make fla-core 0.6's kernels run there with triton 3.7; they patch Triton inside the test
process only (the package never imports this module):
- autotuning: the interpreter has no GPU to time configs on, so every timing is taken as equal and
  each autotuned kernel runs the first config that its pruning leaves;
- loop variables: compiled Triton makes the variable of a `range` / `tl.range` loop a tensor,
  the interpreter a Python int, and fla's chunk kernels call `.to(tl.int64)` on it. The
  interpreter's source rewrite is extended so that such a loop yields interpreter tensors
  (`tl.static_range` loops keep Python ints, as their variables are constexpr when compiled).
On a CUDA device nothing is patched: the kernels compile and autotune as in training.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util

import pytest
import torch

# The extra that brings fla and triton (pyproject.toml).
INSTALL_HINT = "pip install -e '.[interpret]'"
FLA_MODULES = ("fla.ops.linear_attn", "fla.ops.linear_attn.naive", "fla.ops.rwkv4")


def missing_packages() -> list[str]:
    return [name for name in ("triton", "fla") if importlib.util.find_spec(name) is None]


def _is_dynamic_range(loop_iter: ast.expr) -> bool:
    """`range(...)` or `tl.range(...)`: loops whose variable is a tensor in compiled Triton."""
    if not isinstance(loop_iter, ast.Call):
        return False
    func = loop_iter.func
    name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
    return name == "range"


def _visit_for(self, node: ast.For) -> ast.For:
    self.generic_visit(node)
    if _is_dynamic_range(node.iter):
        as_tensors = ast.parse(
            "(interpreter_semantic.to_tensor(_value, False) for _value in RANGE)", mode="eval"
        ).body
        as_tensors.generators[0].iter = node.iter
        node.iter = as_tensors
    return node


def _equal_timings(self, *args, config, **kwargs) -> float:
    return 0.0


def install_shims() -> None:
    """Patch Triton's interpreter for fla, for the whole test process (tests/conftest.py calls
    this where the interpreter is on): the seam's tests force kernel=fla as well."""
    from triton.runtime import autotuner, interpreter

    autotuner.Autotuner._bench = _equal_timings
    interpreter.ASTTransformer.visit_For = _visit_for


def load_fla(device: torch.device) -> None:
    """Import fla's modules so that their kernels run on `device`: compiled on CUDA, otherwise
    under the interpreter with the shims above."""
    if device.type != "cuda":
        import triton.language.standard
        from triton.runtime import autotuner, interpreter

        if not isinstance(triton.language.standard.sigmoid, interpreter.InterpretedFunction):
            pytest.fail("triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py)")
        if autotuner.Autotuner._bench is not _equal_timings:
            pytest.fail("the interpreter shims are not installed (tests/conftest.py)")
    for name in FLA_MODULES:
        importlib.import_module(name)
