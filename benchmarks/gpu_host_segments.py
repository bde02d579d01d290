"""Where the experts block's host time goes, one call at a time, with the GPU idle at its start.

``moe-tune bench``'s host column times loops of calls without synchronising; when the GPU is the
slower side a launch can wait on it, so that figure may hold GPU time. Here each fwd+bwd starts
on a drained GPU (no launch can wait), and the time of the named parts of moe-tune's path is
summed per call by wrapping them:

* fwd, bwd: the module's forward, and ``out.backward(grad)``;
* experts_forward: the transformers integration's forward (within fwd), layout_check and
  experts_weights: its module checks and weight look-up, moe_experts: the op it calls,
  graphs.experts_block and graphs._pair_for: the graphed path's entry and its key look-up;
* graphed.forward / graphed.backward: the CUDA-graph Function's bodies (copies, replay, clones,
  the weight gradients' launches), replay: ``CUDAGraph.replay``, weight_grads: the two dW
  gradients' allocations and bound launches, launch: every Triton launch through ``launch_kernel``;
* eager.forward / eager.backward: the eager Function's bodies.

Medians over ``--calls`` calls, µs, for moe-tune eager and graphed, and the loop figure of the
bench beside them. Writes ``OUT/host_segments.json``; with ``--cprofile`` also
``OUT/cprofile_<eager|graphed>_T<tokens>.txt``, the Python functions with the most own time (and
the most time with their callees) over 20 fwd+bwd calls each on a drained GPU.

    python3 benchmarks/gpu_host_segments.py --out DIR [--model qwen3-30b-a3b] [--tokens 128] [--cprofile]
"""

from __future__ import annotations

import collections
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import probe_args  # noqa: E402

_spent: collections.Counter = collections.Counter()


def _timed(name, fn):
    def call(*args, **kwargs):
        t = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _spent[name] += time.perf_counter() - t
    return call


def instrument() -> None:
    import torch

    from moe_tune.integrations import peft
    from moe_tune.integrations import transformers as integration
    from moe_tune.ops import graphs, launch, moe_experts

    for name, owner, attr in (("graphed.forward", graphs._GraphedBlock, "forward"),
                              ("graphed.backward", graphs._GraphedBlock, "backward")):
        setattr(owner, attr, staticmethod(_timed(name, getattr(owner, attr))))
    # The integration's forward, its layout check and weight look-up, and the graphs' key look-up
    # (transformers' ExpertsInterface holds experts_forward itself: wrapped in place there).
    from transformers.integrations.moe import ExpertsInterface

    timed_forward = _timed("experts_forward", integration.experts_forward)
    ExpertsInterface.register(integration.DEFAULT_NAME, timed_forward)
    integration.experts_forward = timed_forward
    for name, owner, attr in (("layout_check", integration, "_check_layout_once"),
                              ("experts_weights", peft, "experts_weights"),
                              ("moe_experts", integration, "moe_experts"),
                              ("graphs.experts_block", moe_experts.graphs, "experts_block"),
                              ("graphs._pair_for", graphs, "_pair_for")):
        if hasattr(owner, attr):  # an older tree may lack one
            setattr(owner, attr, _timed(name, getattr(owner, attr)))
    for cls in (c for c in vars(moe_experts).values() if isinstance(c, type)
                and issubclass(c, torch.autograd.Function)):
        cls.forward = staticmethod(_timed("eager.forward", cls.forward))
        cls.backward = staticmethod(_timed("eager.backward", cls.backward))
    torch.cuda.CUDAGraph.replay = _timed("replay", torch.cuda.CUDAGraph.replay)
    graphs._launched_into = _timed("weight_grads", graphs._launched_into)
    launch.launch_kernel = _timed("launch", launch.launch_kernel)


def _cprofile(prepared, inputs, path: Path, calls: int = 20) -> None:
    """cProfile over ``calls`` fwd+bwd calls, each on a drained GPU: the functions with the most
    own time, then with the most time including their callees."""
    import cProfile
    import io
    import pstats

    import torch

    profiler = cProfile.Profile()
    for _ in range(calls):
        inputs.clear()
        torch.cuda.synchronize()
        profiler.enable()
        out = prepared.fwd()
        out.backward(inputs.grad)
        profiler.disable()
        del out
    torch.cuda.synchronize()
    stats = pstats.Stats(profiler, stream=io.StringIO()).stats
    lines = []
    for title, column in (("own time", 2), ("with callees", 3)):
        lines.append(f"µs per fwd+bwd, {title} (calls per fwd+bwd)")
        for (file, line, name), row in sorted(stats.items(), key=lambda kv: -kv[1][column])[:45]:
            lines.append(f"{row[column] / calls * 1e6:9.1f}  {row[1] / calls:6.1f}  {Path(file).name}:{line}({name})")
        lines.append("")
    path.write_text("\n".join(lines))


def main(argv=None) -> int:
    ap_args, out_dir = probe_args.parse(argv, __doc__.splitlines()[0], [128], ("--cprofile",))
    import torch

    from moe_tune import models
    from moe_tune.bench.block import block_inputs, build_block
    from moe_tune.bench.host import _loop_ms
    from moe_tune.ops import graphs

    instrument()
    shape = models.load_preset(ap_args.model)
    block = build_block(shape, "bfloat16", "cuda")
    report = {}
    for T in ap_args.tokens:
        inputs = block_inputs(block, shape, T, "bfloat16", "cuda")
        for label, graphed in (("eager", False), ("graphed", True)):
            graphs.enable(graphed)
            graphs.reset()
            prepared, call = probe_args.warmed_block_call(block, "moe_tune", inputs)
            loop = statistics.median(_loop_ms(call, 20, "cuda")[0] for _ in range(7))
            per_call = collections.defaultdict(list)
            for _ in range(40):
                inputs.clear()
                torch.cuda.synchronize()
                _spent.clear()
                t0 = time.perf_counter()
                out = prepared.fwd()
                t1 = time.perf_counter()
                out.backward(inputs.grad)
                t2 = time.perf_counter()
                per_call["fwd"].append(t1 - t0)
                per_call["bwd"].append(t2 - t1)
                per_call["fwd+bwd"].append(t2 - t0)
                for name, s in _spent.items():
                    per_call[name].append(s)
                del out
            torch.cuda.synchronize()
            if ap_args.cprofile:
                _cprofile(prepared, inputs, out_dir / f"cprofile_{label}_T{T}.txt")
            row = {name: statistics.median(v) * 1e6 for name, v in per_call.items()}
            row["loop_fwd+bwd"] = loop * 1e3
            report[f"{label}@{T}"] = row
            print(label, T, json.dumps({k: round(v, 1) for k, v in row.items()}), flush=True)
    graphs.enable(False)
    (out_dir / "host_segments.json").write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
