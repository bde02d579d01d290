"""Every problem the sweep tunes, run through ``moe_tune.ops.problems`` (inputs, one launch, the
float64 reference) in Triton's interpreter: the block's fused problems and the plain ones, with
pointer and TMA configs and a NaN-poisoned output."""

from __future__ import annotations

import pytest
import torch

from moe_tune.device import INTERPRETER_DEVICE
from moe_tune.ops import problems
from moe_tune.ops.routing import build_routing
from moe_tune.problem import KernelConfig, MoeShape, Problem
from moe_tune.reference import relative_error

pytestmark = [pytest.mark.skipif(torch.cuda.is_available(), reason="CPU interpreter tests")]

SHAPE = MoeShape(E=4, H=64, I=48, topk=2)  # I=48: masked column blocks
# the block's six problems (both dW "sorted") and the plain gathered/weighted dWs of grouped_gemm
PLAIN_DW = [p.with_pass("dw") for p in SHAPE.problems("float32") if p.pass_ == "dw"]
CASES = [(p.key, p) for p in SHAPE.problems("float32") + PLAIN_DW]
CONFIGS = [
    KernelConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=1, num_stages=1),
    KernelConfig(BLOCK_M=32, BLOCK_N=32, BLOCK_K=16, GROUP_M=2, num_warps=1, num_stages=1, TMA_LOAD=True),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=["pointers", "tma"])
@pytest.mark.parametrize("key, problem", CASES, ids=[c[0] for c in CASES])
def test_problem_matches_reference(key, problem, cfg):
    T = 9
    ids = torch.stack([torch.randperm(problem.E - 1)[:problem.topk] for _ in range(T)])  # expert 3 stays empty
    routing = build_routing(ids, problem.E)
    inputs = problems.make_inputs(problem, routing, lambda *s: torch.randn(*s), lambda *s: torch.rand(*s))
    out = torch.full(problems.output_shape(problem, routing), float("nan"))
    got = problems.launch(problem, inputs, routing, cfg, out, INTERPRETER_DEVICE)
    assert relative_error(got, problems.reference(problem, inputs, routing)) < 1e-5


def test_unsupported_problem_is_refused():
    from moe_tune.errors import InvalidInputError

    kn = Problem("forward", 4, 96, 64, 2, "float32", gather=True, weight_layout="kn")
    assert not problems.supported(kn)
    with pytest.raises(InvalidInputError, match="no launcher"):
        problems.make_inputs(kn, None, torch.randn, torch.rand)
