"""When the host launches each part of an eager training step, and when the GPU finishes it.

`moe-tune bench --step` reports a step's host time and its wall time; this probe shows where in the
step the GPU falls behind the host (GPU-bound stretches) and where it waits for it (host-bound
ones). It builds the bench's 2-layer LM (``moe_tune.bench.lm``) once per implementation — eager
grouped_mm, moe-tune, moe-tune with ``MOE_TUNE_CUDA_GRAPHS`` — and puts marks at the edges of
each decoder layer, its attention, its MoE block and the block's router and experts modules,
forward (module hooks) and backward (full backward hooks),
and at the step's phases (loss computed, backward returned, optimizer step, zero_grad). At each
mark it reads the host clock and records a CUDA event on the current stream: the event's time is
when the GPU got through everything launched before the mark. Per mark, medians over the timed
steps (each starting on a drained GPU): host ms and GPU ms since the step began, and the GPU's lag
(GPU − host; near zero: the GPU waits for the host; growing: the GPU is the bound). The hooks add
host time of their own (~10-20 µs a mark), the same for every implementation.

    python3 benchmarks/gpu_step_timeline.py --out DIR [--model qwen3-30b-a3b] [--tokens 4096]
        [--mode full] [--steps 20]

Writes ``OUT/step_timeline.json`` and prints a table per implementation.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

IMPLEMENTATIONS = ("grouped_mm", "moe_tune", "moe_tune+cuda_graphs")


class Marks:
    """Host times and CUDA events at named marks of one step."""

    def __init__(self):
        import torch

        self.torch = torch
        self.names: list[str] = []
        self.host: list[float] = []
        self.events: list = []
        self.t0 = 0.0

    def start(self) -> None:
        self.names.clear()
        self.host.clear()
        self.events.clear()
        self.t0 = time.perf_counter()
        self.mark("start")

    def mark(self, name: str) -> None:
        event = self.torch.cuda.Event(enable_timing=True)
        event.record()
        self.host.append((time.perf_counter() - self.t0) * 1e3)
        self.names.append(name)
        self.events.append(event)

    def read(self) -> list[tuple[str, float, float]]:
        """(mark, host ms, GPU ms) since the step began; call after synchronising."""
        first = self.events[0]
        return [(n, h, first.elapsed_time(e)) for n, h, e in zip(self.names, self.host, self.events)]


def hook(model, marks: Marks) -> None:
    """Marks at each decoder layer's edges and at its attention's, its MoE block's, the block's
    router's and its experts module's."""
    from torch import nn

    for i, layer in enumerate(model.model.layers):
        parts = [(layer, f"layer {i}"), (layer.self_attn, f"layer {i} attention"), (layer.mlp, f"layer {i} moe")]
        parts += [(getattr(layer.mlp, attr), f"layer {i} {attr}") for attr in ("gate", "experts")
                  if isinstance(getattr(layer.mlp, attr, None), nn.Module)]
        for module, name in parts:
            module.register_forward_pre_hook(lambda m, a, n=name: marks.mark(f"fwd {n} in"))
            module.register_forward_hook(lambda m, a, o, n=name: marks.mark(f"fwd {n} out"))
            module.register_full_backward_pre_hook(lambda m, g, n=name: marks.mark(f"bwd {n} in"))
            module.register_full_backward_hook(lambda m, gi, go, n=name: marks.mark(f"bwd {n} out"))


def run(impl: str, master, ids, mode: str, steps: int, warmup: int, device: str = "cuda") -> list[dict]:
    import torch

    from moe_tune.bench.lm import make_optimizer, prepare_mode
    from moe_tune.ops import graphs

    graphs.reset()
    model = prepare_mode(copy.deepcopy(master), "moe_tune" if impl.endswith("cuda_graphs") else impl, mode, 0)
    optimizer = make_optimizer([p for p in model.parameters() if p.requires_grad], device)
    marks = Marks()
    hook(model, marks)
    samples: dict[str, list] = {}
    order: list[str] = []
    with graphs.switched(impl.endswith("cuda_graphs")):
        for i in range(warmup + steps):
            torch.cuda.synchronize()
            marks.start()
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            marks.mark("loss")
            loss.backward()
            marks.mark("backward returned")
            optimizer.step()
            marks.mark("optimizer step")
            optimizer.zero_grad(set_to_none=True)
            marks.mark("zero_grad")
            torch.cuda.synchronize()
            if i < warmup:
                continue
            for name, host, gpu in marks.read():
                if name not in samples:
                    order.append(name)
                samples.setdefault(name, []).append((host, gpu))
    rows = []
    for name in order:
        host = statistics.median(h for h, _ in samples[name])
        gpu = statistics.median(g for _, g in samples[name])
        rows.append({"mark": name, "host_ms": round(host, 3), "gpu_ms": round(gpu, 3), "lag_ms": round(gpu - host, 3)})
    del model, optimizer
    graphs.reset()
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--model", default="qwen3-30b-a3b")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--mode", default="full")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()

    from moe_tune.bench.lm import build_lm, lm_config, token_batch
    from moe_tune.models import find_preset

    preset = find_preset(args.model)
    config = lm_config(preset.shape, preset.family)
    master = build_lm(config, "bfloat16", "cuda", 0)
    ids = token_batch(config, args.tokens, 2048, "cuda", 0)
    result = {"model": args.model, "tokens": args.tokens, "mode": args.mode, "steps": args.steps, "rows": {}}
    for impl in IMPLEMENTATIONS:
        rows = result["rows"][impl] = run(impl, master, ids, args.mode, args.steps, args.warmup)
        print(f"\n{impl} ({args.mode}, {args.tokens} tokens): mark, host ms, GPU ms, lag ms")
        for r in rows:
            print(f"  {r['mark']:<24} {r['host_ms']:8.3f} {r['gpu_ms']:8.3f} {r['lag_ms']:8.3f}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "step_timeline.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
