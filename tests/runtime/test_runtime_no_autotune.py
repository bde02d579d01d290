"""Proof that the training path never benchmarks or autotunes, and that importing the loader is
cheap: a forward+backward through ``moe_tune.grouped_gemm`` (Triton's CPU interpreter) with every
timing entry point rigged to raise, one GEMM served from a cache file, the other from misses."""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
import subprocess
import sys
import warnings

import pytest
import torch

from moe_tune import runtime
from moe_tune.cache import CacheFile, CacheStore
from moe_tune.cache.testing import random_measurement
from moe_tune.device import INTERPRETER_DEVICE, interpreting
from moe_tune.errors import CacheWarning
from moe_tune.problem import KernelConfig, Problem

# dtype, relative error bound of outputs and gradients against the float64 reference
TOLERANCES = {torch.float32: 1e-4, torch.float16: 5e-3}

CACHED = KernelConfig(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4, num_stages=1)

# Names under moe_tune.tuning that time, search, tune or start timing workers (anything matching
# is rigged to raise; exception classes are left alone so `except` clauses keep working).
_TIMING_NAME = re.compile(r"bench|tim(e|ing|er)|measure|sweep|tune|search|profil|engine|worker", re.IGNORECASE)


class Benchmarked(AssertionError):
    pass


def _raiser(name):
    def refuse(*args, **kwargs):
        raise Benchmarked(f"the runtime path called {name}")

    return refuse


def _rig_timing(monkeypatch) -> list[str]:
    import triton
    import triton.runtime.autotuner as autotuner
    import triton.testing

    rigged = ["triton.testing.do_bench", "triton.testing.do_bench_cudagraph", "Autotuner.run", "torch.cuda.Event"]
    monkeypatch.setattr(triton.testing, "do_bench", _raiser("triton.testing.do_bench"))
    monkeypatch.setattr(triton.testing, "do_bench_cudagraph", _raiser("triton.testing.do_bench_cudagraph"))
    monkeypatch.setattr(autotuner.Autotuner, "run", _raiser("Autotuner.run"))
    monkeypatch.setattr(torch.cuda, "Event", _raiser("torch.cuda.Event"))
    import moe_tune.tuning as tuning

    for info in pkgutil.walk_packages(tuning.__path__, "moe_tune.tuning."):
        try:
            module = importlib.import_module(info.name)
        except Exception:  # a colleague's module mid-edit cannot be on the runtime path either
            continue
        for name, obj in list(vars(module).items()):
            if isinstance(obj, type) and issubclass(obj, BaseException):
                continue
            if callable(obj) and getattr(obj, "__module__", None) == module.__name__ and _TIMING_NAME.search(name):
                monkeypatch.setattr(module, name, _raiser(f"{module.__name__}.{name}"))
                rigged.append(f"{module.__name__}.{name}")
    return rigged


def _moe_layer(x, w1, w2, routing, weights, I):
    from moe_tune import grouped_gemm

    h = grouped_gemm(x, w1, routing, gather=True)  # [M, 2I] in expert order
    act = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
    y = grouped_gemm(act, w2, routing, scatter=True, routing_weights=weights)  # [M, H] in slot order
    return y.view(routing.num_tokens, routing.topk, -1).sum(1)


def _reference_layer(x, w1, w2, routing, weights, I):
    from moe_tune.reference import reference_forward

    h = reference_forward(x, w1, routing, gather=True)
    act = torch.nn.functional.silu(h[:, :I]) * h[:, I:]
    y = reference_forward(act, w2, routing, scatter=True, weights=weights)
    return y.view(routing.num_tokens, routing.topk, -1).sum(1)


@pytest.mark.skipif(not interpreting() or torch.cuda.is_available(), reason="CPU interpreter test")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_forward_backward_never_benchmarks(layers, monkeypatch, rng, dtype):
    from moe_tune.ops.routing import build_routing, random_routing

    T, E, k, H, I = 16, 4, 2, 32, 16
    up = Problem("forward", E, 2 * I, H, k, {torch.float32: "float32", torch.float16: "float16"}[dtype], gather=True)
    cache = CacheFile.new(INTERPRETER_DEVICE, command="test")
    for pass_ in ("forward", "dx", "dw"):
        cache.add(up.with_pass(pass_), T, CACHED, random_measurement(rng))
    CacheStore(layers.user).write(cache)

    rigged = _rig_timing(monkeypatch)
    assert len(rigged) >= 4

    routing = build_routing(random_routing(T, E, k), E)
    x = torch.randn(T, H, dtype=dtype, requires_grad=True)
    w1 = (torch.randn(E, 2 * I, H, dtype=dtype) / H**0.5).requires_grad_()
    w2 = (torch.randn(E, H, I, dtype=dtype) / I**0.5).requires_grad_()
    weights = torch.rand(T * k, dtype=dtype, requires_grad=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = _moe_layer(x, w1, w2, routing, weights, I)
        grad_out = torch.randn_like(out)
        out.backward(grad_out)

    # The up GEMM came from the cache, the down GEMM from misses (one warning per problem).
    for pass_ in ("forward", "dx", "dw"):
        assert runtime.explain(up.with_pass(pass_), T, INTERPRETER_DEVICE).config == CACHED
    misses = [w for w in seen if issubclass(w.category, CacheWarning)]
    assert misses and all("no tuned config" in str(w.message) and "/scatter" in str(w.message) for w in misses)

    leaves = [t.detach().double().requires_grad_() for t in (x, w1, w2, weights)]
    ref = _reference_layer(*leaves[:3], routing, leaves[3], I)
    ref.backward(grad_out.double())
    tol = TOLERANCES[dtype]
    assert ((out.double() - ref).norm() / ref.norm()).item() < tol
    for got, want in zip((x, w1, w2, weights), leaves):
        assert torch.isfinite(got.grad).all()
        assert ((got.grad.double() - want.grad).norm() / want.grad.norm()).item() < tol


def test_import_loads_no_torch_triton_or_cli():
    code = ("import sys, json, moe_tune.runtime; "
            "print(json.dumps(sorted(m for m in ('torch', 'triton', 'typer', 'rich', 'click', 'filelock', "
            "'platformdirs', 'moe_tune.cli', 'moe_tune.tuning', 'moe_tune.ops') if m in sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout) == []
