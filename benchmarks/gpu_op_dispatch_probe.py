"""Host time of one call of each backward op of the experts block, three ways in one process: the
op as shipped (a plain ``torch.library`` op, ``launch.register_backward_op``), the same body
registered as a ``torch.library.custom_op`` (how it shipped before), and the body called as a
Python function. The ops' bodies launch their kernels on the GPU; each batch of calls is timed on
the host only, then synchronised, so the GPU's time stays out of the figure.

Rounds alternate the three ways (order reversed every other round); prints and writes
``OUT/op_dispatch.json``: per op and way, the median µs per call over rounds.

    PYTHONPATH=. python3 benchmarks/gpu_op_dispatch_probe.py --out DIR [--tokens 128]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import probe_args  # noqa: E402

ROUNDS = 12
BATCH = 40


def main(argv=None) -> int:
    args, out_dir = probe_args.parse(argv, __doc__.splitlines()[0], [128])
    import torch

    from moe_tune import models
    from moe_tune.bench.block import block_inputs, build_block
    from moe_tune.ops import custom_ops

    shape = models.load_preset(args.model)
    block = build_block(shape, "bfloat16", "cuda")
    experts = block.experts
    results = {}
    for T in args.tokens:
        inputs = block_inputs(block, shape, T, "bfloat16", "cuda")
        with torch.no_grad():
            hidden, weights = inputs.x.detach(), inputs.top_k_weights.detach()
            gate_up_w, down_w = experts.gate_up_proj.detach(), experts.down_proj.detach()
            _, gate_up_out, offsets, slots = custom_ops.moe_experts_fwd(hidden, gate_up_w, down_w, inputs.top_k_index,
                                                                        weights, "silu")
            grad = inputs.grad
            weighted_act, d_gate_up_out, _ = custom_ops.moe_experts_bwd_act(grad, down_w, weights, gate_up_out,
                                                                             offsets, slots)
        k = weights.shape[1]
        calls = {
            "bwd_act": (custom_ops._moe_experts_bwd_act, custom_ops.moe_experts_bwd_act,
                        (grad, down_w, weights, gate_up_out, offsets, slots)),
            "bwd_up": (custom_ops._moe_experts_bwd_up, custom_ops.moe_experts_bwd_up,
                       (d_gate_up_out, hidden, gate_up_w, offsets, slots, k, True, True)),
            "bwd_down": (custom_ops._moe_experts_bwd_down, custom_ops.moe_experts_bwd_down,
                         (grad, weighted_act, down_w, offsets, slots, k)),
        }
        for name, (body, shipped, call_args) in calls.items():
            custom = torch.library.custom_op(f"moe_tune_probe::{name}_{T}", body, mutates_args=())
            ways = {"shipped": shipped, "custom_op": custom, "body": body}
            samples = {way: [] for way in ways}
            with torch.no_grad():
                for fn in ways.values():  # warm: launchers, configs
                    fn(*call_args)
                torch.cuda.synchronize()
                for r in range(ROUNDS):
                    order = list(ways) if r % 2 == 0 else list(reversed(ways))
                    for way in order:
                        fn = ways[way]
                        start = time.perf_counter()
                        for _ in range(BATCH):
                            fn(*call_args)
                        samples[way].append((time.perf_counter() - start) / BATCH * 1e6)
                        torch.cuda.synchronize()
            results[f"{name}@{T}"] = {way: round(statistics.median(s), 1) for way, s in samples.items()}
            print(name, T, results[f"{name}@{T}"], flush=True)
    (out_dir / "op_dispatch.json").write_text(json.dumps(
        {"device": torch.cuda.get_device_name(), "model": args.model, "us_per_call": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
