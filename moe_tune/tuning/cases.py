"""The inputs a candidate is gated and timed on: one ``Case`` per (problem, token bucket, routing,
seed) on one device.

Data flow of ``Case(problem, tokens, routing, seed, device)``: a seed derived from (seed, problem,
tokens) (``case_seed``: the same in every process, so a resumed or split sweep rebuilds the same
inputs) → top-k expert ids from the routing spec → routing metadata (``ops.routing``) → random
activations, weights and routing weights from seeded generators → the float reference
(``moe_tune.reference``: float32 on a GPU with TF32 off, float64 on the CPU). ``launch(cfg, out)``
runs the problem's launcher with one config, writing into ``out``.
"""

from __future__ import annotations

import hashlib

from moe_tune.problem import KernelConfig, Problem
from moe_tune.tuning.routing_spec import RoutingSpec


def case_seed(seed: int, problem: Problem, tokens: int) -> int:
    text = f"{seed}/{problem.key}/{tokens}".encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "little")


class Case:
    """Inputs, routing and reference output of one (problem, token bucket) on one device; the
    tensors and the launch come from ``moe_tune.ops.problems``, so every problem is timed as the
    experts block runs it (a "sorted" dW on expert-ordered operands included)."""

    def __init__(self, problem: Problem, tokens: int, routing_spec: RoutingSpec, seed: int, device,
                 *, with_reference: bool = True, compile_only: bool = False):
        import torch

        from moe_tune.ops import problems
        from moe_tune.ops.routing import build_routing

        self.problem, self.tokens = problem, tokens
        p = problem
        dtype = getattr(torch, p.dtype)
        seed = case_seed(seed, problem, tokens)
        ids = routing_spec.top_k_ids(tokens, p.E, p.topk, seed)
        self.routing = build_routing(ids.to(device), p.E)
        gen = torch.Generator(device=device).manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

        def rand(*shape):
            return torch.rand(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

        # Compile workers launch nothing (``launch.compile_only``): one expert's memory stands in
        # for each stack of E (``problems.expanded``).
        self.compile_only = compile_only
        self.inputs = problems.make_inputs(p, self.routing, randn, rand, compile_only=compile_only)
        self.out_shape = problems.output_shape(p, self.routing)
        self.dtype = dtype
        self.device = torch.device(device)
        self.reference = self._reference() if with_reference and not compile_only else None
        self.gated: dict[KernelConfig, float] = {}  # config → relative error, once it passed the gate

    def _reference(self):
        import torch

        from moe_tune.ops import problems

        ref_dtype = torch.float32 if self.device.type == "cuda" else torch.float64
        return problems.reference(self.problem, self.inputs, self.routing, ref_dtype)

    def new_output(self, fill: float = float("nan")):
        import torch

        if self.compile_only and self.problem.pass_ == "dw":  # [E, ...]: nothing is written
            from moe_tune.ops import problems

            return problems.expanded(self.out_shape, torch.empty(0, dtype=self.dtype, device=self.device))
        return torch.full(self.out_shape, fill, dtype=self.dtype, device=self.device)

    def launch(self, cfg: KernelConfig, out=None):
        """Run ``cfg`` once into ``out`` (``out_shape``; a fresh one when None) and return the
        checked output."""
        from moe_tune.device import query_device
        from moe_tune.ops import problems
        from moe_tune.space import check_config

        check_config(self.problem, cfg, query_device(self.device))
        out = self.new_output() if out is None else out
        return problems.launch(self.problem, self.inputs, self.routing, cfg, out, query_device(self.device))
