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
    """Inputs, routing and reference output of one (problem, token bucket) on one device."""

    def __init__(self, problem: Problem, tokens: int, routing_spec: RoutingSpec, seed: int, device,
                 *, with_reference: bool = True, weight_values: bool = True):
        import torch

        from moe_tune.ops.routing import build_routing

        self.problem, self.tokens = problem, tokens
        p = problem
        dtype = getattr(torch, p.dtype)
        seed = case_seed(seed, problem, tokens)
        ids = routing_spec.top_k_ids(tokens, p.E, p.topk, seed)
        self.routing = build_routing(ids.to(device), p.E)
        rows = tokens * p.topk
        gen = torch.Generator(device=device).manual_seed(seed)

        def randn(*shape):
            return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)

        self.weights = None
        if p.weighted:
            self.weights = torch.rand(rows, generator=gen, device=device, dtype=torch.float32).to(dtype)
        fwd_rows = tokens if p.gather else rows
        self.w = self.x = self.dy = None
        if p.pass_ in ("forward", "dx"):
            # Compile workers never read the weights: an uninitialised tensor is enough there.
            self.w = randn(p.E, p.N, p.K) if weight_values else torch.empty(p.E, p.N, p.K, dtype=dtype, device=device)
        if p.pass_ in ("forward", "dw"):
            self.x = randn(fwd_rows, p.K)
        if p.pass_ in ("dx", "dw"):
            self.dy = randn(rows, p.N)
        self.out_shape = {"forward": (rows, p.N), "dx": (rows, p.K), "dw": (p.E, p.N, p.K)}[p.pass_]
        self.dtype = dtype
        self.device = torch.device(device)
        self.reference = self._reference() if with_reference else None
        self.gated: dict[KernelConfig, float] = {}  # config → relative error, once it passed the gate

    def _reference(self):
        import torch

        from moe_tune.reference import reference_dw, reference_dx, reference_forward

        p = self.problem
        ref_dtype = torch.float32 if self.device.type == "cuda" else torch.float64
        flags = dict(gather=p.gather, scatter=p.scatter, weights=self.weights, dtype=ref_dtype)
        if p.pass_ == "forward":
            return reference_forward(self.x, self.w, self.routing, **flags)
        if p.pass_ == "dx":
            return reference_dx(self.dy, self.w, self.routing, **flags)
        return reference_dw(self.dy, self.x, self.routing, **flags)

    def new_output(self, fill: float = float("nan")):
        import torch

        return torch.full(self.out_shape, fill, dtype=self.dtype, device=self.device)

    def launch(self, cfg: KernelConfig, out=None):
        """Run ``cfg`` once; ``out`` (``out_shape``), when given, is written in place."""
        from moe_tune.ops import grouped_gemm as gg

        p = self.problem
        flags = dict(gather=p.gather, scatter=p.scatter, weights=self.weights, config=cfg, out=out)
        if p.pass_ == "forward":
            return gg.forward(self.x, self.w, self.routing, **flags)
        if p.pass_ == "dx":
            return gg.backward_dx(self.dy, self.w, self.routing, **flags)
        return gg.backward_dw(self.dy, self.x, (p.E, p.N, p.K), self.routing, **flags)
