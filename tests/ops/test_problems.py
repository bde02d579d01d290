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
GPT_OSS = MoeShape(E=4, H=64, I=48, topk=2, layout="gpt_oss")  # [E, K, N] weights, "sort" launches
# the block's six problems (both dW "sorted"), the plain gathered/weighted dWs of grouped_gemm, and
# gpt-oss's six
PLAIN_DW = [p.with_pass("dw") for p in SHAPE.problems("float32") if p.pass_ == "dw"]
CASES = [(p.key, p) for p in SHAPE.problems("float32") + PLAIN_DW + GPT_OSS.problems("float32")]
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
    if "sorted" in inputs:
        inputs["sorted"].fill_(float("nan"))
    out = torch.full(problems.output_shape(problem, routing), float("nan"))
    got = problems.launch(problem, inputs, routing, cfg, out, INTERPRETER_DEVICE)
    assert relative_error(got, problems.reference(problem, inputs, routing)) < 1e-5
    if "sorted" in inputs:  # a "sort" launch also wrote the rows it gathered, in expert order
        gathered = inputs["x"] if problem.pass_ == "forward" else inputs["dy"]
        div = routing.topk if problem.pass_ == "forward" else 1
        assert torch.equal(inputs["sorted"], gathered[routing.sorted_slots.long() // div])


def test_unsupported_problem_is_refused():
    from moe_tune.errors import InvalidInputError

    sort_nk = Problem("forward", 4, 96, 64, 2, "float32", gather=True, fusion="sort")
    assert not problems.supported(sort_nk)
    with pytest.raises(InvalidInputError, match="no launcher"):
        problems.make_inputs(sort_nk, None, torch.randn, torch.rand)
