"""LoRA on the experts block of a Qwen3-MoE or gpt-oss layer: moe-tune's fused LoRA path against PEFT's
LoRA on transformers' ``grouped_mm`` experts (eager and under torch.compile, the strongest
baseline), block forward+backward, with peak memory; then (Qwen3-MoE) a 30-step training-loss
match on a tiny model.

Both sides run the same module the way a user does: transformers' ``Qwen3MoeExperts`` or
``GptOssExperts`` (``--model``) with random bf16 weights (no download) wrapped by PEFT's
``ParamWrapper`` (``target_parameters`` on
``gate_up_proj`` and ``down_proj``, random A and B), called with the same hidden states and the
same routing (``top_k_index``/``top_k_weights`` drawn once, outside every timer). The only
difference is ``config._experts_implementation``: ``grouped_mm`` (PEFT folds W + s·B·A for both
stacks every call and backpropagates through it) or ``moe_tune`` (the fused LoRA block,
``moe_tune.ops.lora_block`` or ``moe_tune.ops.gptoss_lora``, through ``moe_tune.integrations.peft``). One fwd+bwd = the forward plus the backward of a fixed output
gradient into the hidden states, the routing weights and the four LoRA factors (the base weights
are frozen). Timed with moe-tune's one GPU timer (``moe_tune.timer.GpuTimer``: do_bench samples,
L2 flushed, median and p20-p80); peak memory is the allocator's high-water mark of one fwd+bwd
above what was allocated before it. moe-tune's output and LoRA gradients are checked against the
eager baseline once per point.

Run (one H100, ~5 minutes): ``PYTHONPATH=. python3 benchmarks/bench_lora.py --out $OUT``
(writes ``bench_lora.json`` and ``bench_lora.md`` under ``--out``; ``--model``, ``--tokens``,
``--ranks``, ``--no-compile``, ``--steps``).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time

DESCRIPTION = "LoRA on the experts block: moe-tune's fused path against PEFT + grouped_mm."

# The experts (DESIGN.md's presets) as transformers' configs name them, and the LoRA issue's target
# (#16): fwd+bwd >= 1.5x the best PEFT + grouped_mm baseline at no more peak memory.
MODELS = {
    "qwen3-30b-a3b": ("qwen3_moe", dict(num_experts=128, hidden_size=2048, moe_intermediate_size=768,
                                        num_experts_per_tok=8)),
    "gpt-oss-20b": ("gpt_oss", dict(num_local_experts=32, hidden_size=2880, intermediate_size=2880,
                                    num_experts_per_tok=4)),
    "gpt-oss-120b": ("gpt_oss", dict(num_local_experts=128, hidden_size=2880, intermediate_size=2880,
                                     num_experts_per_tok=4)),
}
TARGET_SPEEDUP = 1.5
# The loss-match model: small enough for 30 steps in seconds, real enough to route and learn.
TINY = dict(hidden_size=512, moe_intermediate_size=256, num_experts=16, num_experts_per_tok=4, norm_topk_prob=True,
            intermediate_size=1024, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
            vocab_size=512, max_position_embeddings=512)
TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


def _relative_error(a, b) -> float:
    from moe_tune.reference import relative_error

    return float(relative_error(a, b))


def _lora_config(r: int):
    from peft import LoraConfig

    # init_lora_weights=False: B random as well, so the LoRA terms carry real numbers.
    return LoraConfig(r=r, lora_alpha=2 * r, target_parameters=TARGETS, init_lora_weights=False)


def dims(model: str) -> tuple[int, int, int, int]:
    """(E, H, I, k) of ``model``'s experts."""
    family, fields = MODELS[model]
    E = fields["num_experts" if family == "qwen3_moe" else "num_local_experts"]
    I = fields["moe_intermediate_size" if family == "qwen3_moe" else "intermediate_size"]
    return E, fields["hidden_size"], I, fields["num_experts_per_tok"]


def build_experts(model: str, r: int, dtype, seed: int, device="cuda"):
    """A holder module whose ``experts`` is PEFT's ParamWrapper around the model's experts module
    (random weights; gpt-oss's biases too)."""
    import torch
    from peft import inject_adapter_in_model

    family, fields = MODELS[model]
    if family == "qwen3_moe":
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts as Experts

        config = Qwen3MoeConfig(**fields)
    else:
        from transformers import GptOssConfig
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as Experts

        config = GptOssConfig(**fields)
    torch.manual_seed(seed)
    holder = torch.nn.Module()
    holder.experts = Experts(config)
    for p in holder.experts.parameters():
        torch.nn.init.normal_(p, std=0.02)
    holder = holder.to(device, dtype)
    holder = inject_adapter_in_model(_lora_config(r), holder)
    for name, p in holder.named_parameters():
        p.requires_grad_("lora_" in name)
    return holder


def with_implementation(holder, name: str):
    """A deep copy of ``holder`` whose experts run ``name`` (same weights and adapters)."""
    twin = copy.deepcopy(holder)
    twin.experts.get_base_layer().config._experts_implementation = name
    return twin


def _wrappers(holder) -> dict:
    """PEFT's ParamWrapper of each targeted expert parameter, by parameter name."""
    from peft.tuners.lora.layer import ParamWrapper

    return {m.parameter_name: m for m in holder.modules() if isinstance(m, ParamWrapper)}


def peft_fold_forward(holder):
    """PEFT's single-adapter computation as one traceable function (W + s·B·A folded with baddbmm
    for both stacks, then the experts on the folded weights): what torch.compile can make of PEFT +
    grouped_mm at best, since PEFT's per-call parametrization registration does not trace."""
    import torch

    experts, wrappers = holder.experts.get_base_layer(), _wrappers(holder)

    def forward(x, top_k_index, top_k_weights):
        folded = {}
        for name, wrapper in wrappers.items():
            lhs, rhs, scaling = wrapper.get_delta_factors("default")
            weight = wrapper.get_base_layer()._parameters[name]
            folded[name] = torch.baddbmm(weight, lhs, rhs, alpha=scaling)
        return torch.func.functional_call(experts, folded, (x, top_k_index, top_k_weights))

    return forward


def moe_tune_forward(holder):
    """moe-tune's LoRA block on the holder's frozen weights and PEFT factors, as one traceable call."""
    from moe_tune.ops.gptoss_lora import gptoss_experts_lora
    from moe_tune.ops.lora import LoraFactors, MoeLora
    from moe_tune.ops.moe_experts import moe_experts

    experts, wrappers = holder.experts.get_base_layer(), _wrappers(holder)

    def factors(name):
        w = wrappers[name]
        return LoraFactors.from_peft(w.lora_A["default"].weight, w.lora_B["default"].weight, w.num_experts,
                                     w.scaling["default"])

    weights = experts._parameters
    gpt_oss = "gate_up_proj_bias" in weights

    def forward(x, top_k_index, top_k_weights):
        lora = MoeLora(gate_up=factors("gate_up_proj"), down=factors("down_proj"))
        if gpt_oss:
            return gptoss_experts_lora(x, weights["gate_up_proj"], weights["gate_up_proj_bias"], weights["down_proj"],
                                       weights["down_proj_bias"], top_k_index, top_k_weights, lora=lora,
                                       limit=experts.limit, alpha=experts.alpha)
        return moe_experts(x, weights["gate_up_proj"], weights["down_proj"], top_k_index, top_k_weights, lora=lora)

    return forward


def make_step(holder, forward, hidden, top_k_index, top_k_weights, grad_out):
    import torch

    lora = [p for p in holder.parameters() if p.requires_grad]

    def step():
        x = hidden.detach().requires_grad_()
        w = top_k_weights.detach().requires_grad_()
        out = forward(x, top_k_index, w)
        grads = torch.autograd.grad(out, [x, w, *lora], grad_out)
        return out, grads

    return step


def peak_mib(step) -> float:
    import torch

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def bench_rank(r: int, args, timer):
    """Every token count at rank ``r``, one point at a time: the modules and compiled functions are built once per rank
    (``dynamic=True``: one compile serves every token count), inputs per token count."""
    import torch

    from moe_tune.ops.routing import random_routing

    dtype = getattr(torch, args.dtype)
    base = build_experts(args.model, r, dtype, args.seed)
    # (label, experts implementation, forward): eager variants call the PEFT-wrapped module as a
    # model does; compiled ones compile the same computation written as one traceable function.
    variants = [("peft+grouped_mm eager", "grouped_mm", lambda h: h.experts)]
    if not args.no_compile:
        variants.append(("peft+grouped_mm compiled", "grouped_mm",
                         lambda h: torch.compile(peft_fold_forward(h), dynamic=True)))
    variants.append(("moe-tune eager", "moe_tune", lambda h: h.experts))
    if not args.no_compile and not args.eager_moe_tune_only:
        variants.append(("moe-tune compiled", "moe_tune",
                         lambda h: torch.compile(moe_tune_forward(h), fullgraph=True, dynamic=True)))
    built = []
    for label, impl, forward in variants:
        holder = with_implementation(base, impl)
        built.append((label, impl, holder, forward(holder)))
    del base

    E, H, _, k = dims(args.model)
    for T in args.tokens:
        gen = torch.Generator(device="cuda").manual_seed(args.seed + T + r)
        hidden = torch.randn(T, H, device="cuda", generator=gen).to(dtype)
        top_k_index = random_routing(T, E, k, device="cuda", generator=gen)
        top_k_weights = torch.softmax(torch.randn(T, k, device="cuda", generator=gen), -1).to(dtype)
        grad_out = torch.randn(T, H, device="cuda", generator=gen).to(dtype)
        rows, outputs = {}, {}
        for label, impl, holder, forward in built:
            step = make_step(holder, forward, hidden, top_k_index, top_k_weights, grad_out)
            try:
                t0 = time.perf_counter()
                outputs[label] = step()  # compiles and resolves configs outside the timer
                first_s = time.perf_counter() - t0
                summary = timer(step)
                rows[label] = dict(median_ms=summary.median_ms, p20_ms=summary.p20_ms, p80_ms=summary.p80_ms,
                                   n=summary.n, peak_mib=peak_mib(step), first_call_s=first_s)
            except Exception as exc:  # a variant that cannot run (say, compile) is reported, not fatal
                rows[label] = dict(error=f"{type(exc).__name__}: {exc}"[:300])
            del step
            torch.cuda.empty_cache()
        _speedups(rows)
        yield dict(tokens=T, rank=r, rows=rows, checks=_checks(outputs, built))


def _checks(outputs: dict, built: list) -> dict:
    """moe-tune's output and gradients (hidden, routing weights, LoRA factors) against PEFT's eager."""
    ref_out, ref_grads = outputs["peft+grouped_mm eager"]
    checks = {}
    for label in (b[0] for b in built if b[1] == "moe_tune" and b[0] in outputs):
        out, grads = outputs[label]
        errors = [_relative_error(out, ref_out)] + [_relative_error(g, rg) for g, rg in zip(grads, ref_grads)]
        checks[label] = dict(out=errors[0], hidden=errors[1], routing_weights=errors[2], lora_max=max(errors[3:]),
                             ok=errors[0] < 2e-2 and errors[1] < 2e-2 and max(errors[3:]) < 5e-2)
    return checks


def _speedups(rows: dict) -> None:
    baselines = {k: v for k, v in rows.items() if k.startswith("peft") and "median_ms" in v}
    if not baselines:
        return
    best = min(v["median_ms"] for v in baselines.values())
    best_peak = min(v["peak_mib"] for v in baselines.values())
    for row in rows.values():
        if "median_ms" in row:
            row["speedup_vs_best_baseline"] = best / row["median_ms"]
            row["peak_vs_best_baseline"] = row["peak_mib"] / best_peak


def loss_match(args) -> dict:
    """30 AdamW steps of a tiny Qwen3-MoE causal LM under PEFT, grouped_mm vs moe-tune experts."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeForCausalLM

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    base = Qwen3MoeForCausalLM(Qwen3MoeConfig(**TINY)).to("cuda", dtype)
    config = LoraConfig(r=16, lora_alpha=32, target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    gen = torch.Generator(device="cuda").manual_seed(args.seed)
    batches = [torch.randint(0, TINY["vocab_size"], (8, 256), device="cuda", generator=gen) for _ in range(4)]
    curves = {}
    reference = get_peft_model(base, config)
    ours = copy.deepcopy(reference)
    for label, model, impl in (("grouped_mm", reference, "grouped_mm"), ("moe_tune", ours, "moe_tune")):
        model.base_model.model.set_experts_implementation(impl)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
        curve = []
        for step in range(args.steps):
            ids = batches[step % len(batches)]
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            curve.append(loss.item())
        curves[label] = curve
    diffs = [abs(a - b) / abs(b) for a, b in zip(curves["moe_tune"], curves["grouped_mm"])]
    # bf16 noise: two implementations rounding at different points drift apart by ~1% over steps.
    return dict(steps=args.steps, curves=curves, max_rel_diff=max(diffs), final_rel_diff=diffs[-1],
                ok=diffs[-1] < 2e-2 and curves["moe_tune"][-1] < curves["moe_tune"][0])


def markdown(report: dict) -> str:
    from moe_tune.bench.env import header

    E, H, I, k = dims(report["model"])
    lines = [f"# {DESCRIPTION}", "", header(report["env"]), "",
             f"{report['model']} experts (E={E}, H={H}, I={I}, k={k}), {report['dtype']}, "
             "block fwd+bwd (median ms, p20-p80), peak MiB above the inputs; speed-up and memory against the best "
             f"PEFT + grouped_mm baseline (target: >= {TARGET_SPEEDUP}x at <= 1.0x memory).", "",
             "| tokens | r | variant | ms | p20-p80 | peak MiB | speed-up | memory | check |",
             "|---|---|---|---|---|---|---|---|---|"]
    for point in report["points"]:
        for label, row in point["rows"].items():
            check = point["checks"].get(label)
            check_text = "" if check is None else ("ok" if check["ok"] else f"FAIL {check}")
            if "error" in row:
                lines.append(f"| {point['tokens']} | {point['rank']} | {label} | failed: {row['error']} | | | | | |")
                continue
            lines.append(
                f"| {point['tokens']} | {point['rank']} | {label} | {row['median_ms']:.2f} | "
                f"{row['p20_ms']:.2f}-{row['p80_ms']:.2f} | {row['peak_mib']:.0f} | "
                f"{row.get('speedup_vs_best_baseline', float('nan')):.2f}x | "
                f"{row.get('peak_vs_best_baseline', float('nan')):.2f}x | {check_text} |")
    lm = report.get("loss_match")
    if lm:
        lines += ["", f"Loss match, {lm['steps']} AdamW steps of a tiny Qwen3-MoE under PEFT (r=16): final loss "
                  f"grouped_mm {lm['curves']['grouped_mm'][-1]:.4f}, moe-tune {lm['curves']['moe_tune'][-1]:.4f}; "
                  f"max relative difference over the steps {lm['max_rel_diff']:.2e}, final {lm['final_rel_diff']:.2e} "
                  f"({'ok' if lm['ok'] else 'FAIL'})."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=DESCRIPTION)
    parser.add_argument("--out", required=True, help="directory for bench_lora.json and bench_lora.md")
    parser.add_argument("--model", default="qwen3-30b-a3b", choices=sorted(MODELS))
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--eager-moe-tune-only", action="store_true",
                        help="time moe-tune eager only (the baselines still run eager and compiled)")
    parser.add_argument("--steps", type=int, default=None,
                        help="training steps of the Qwen3-MoE loss match (0: skip it; default 30 for "
                             "qwen3-30b-a3b, else 0)")
    parser.add_argument("--warmup", type=float, default=25, help="timer warm-up per measurement, ms")
    parser.add_argument("--rep", type=float, default=100, help="timer repetition time per measurement, ms")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps is None:
        args.steps = 30 if args.model == "qwen3-30b-a3b" else 0

    import torch

    if not torch.cuda.is_available():
        print("bench_lora: needs a CUDA GPU", file=sys.stderr)
        return 2
    import warnings

    from moe_tune.bench.env import environment
    from moe_tune.errors import CacheWarning
    from moe_tune.integrations.transformers import register
    from moe_tune.timer import GpuTimer

    register()
    # A LoRA problem without a cache entry runs the heuristic default: one warning per problem.
    warnings.simplefilter("once", CacheWarning)
    timer = GpuTimer(warmup_ms=args.warmup, rep_ms=args.rep)
    report = dict(env=environment(), model=args.model, dtype=args.dtype, timer=timer.describe(), points=[])
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()

    def write() -> str:  # after every point: a run cut short keeps what it measured
        report["wall_s"] = time.perf_counter() - started
        with open(os.path.join(args.out, "bench_lora.json"), "w", encoding="utf-8") as f:
            json.dump(report, f, indent=1)
        text = markdown(report)
        with open(os.path.join(args.out, "bench_lora.md"), "w", encoding="utf-8") as f:
            f.write(text)
        return text

    for r in args.ranks:
        for point in bench_rank(r, args, timer):
            report["points"].append(point)
            summary = ", ".join(f"{k} {v['median_ms']:.2f} ms / {v['peak_mib']:.0f} MiB" if "median_ms" in v
                                else f"{k} failed" for k, v in point["rows"].items())
            print(f"T={point['tokens']} r={r}: {summary} ({time.perf_counter() - started:.0f} s)", file=sys.stderr)
            write()
    if args.steps:
        report["loss_match"] = loss_match(args)
        print(f"loss match: final rel diff {report['loss_match']['final_rel_diff']:.2e}", file=sys.stderr)
    print(write())
    failed = [c for p in report["points"] for c in p["checks"].values() if not c["ok"]]
    return 1 if failed or (args.steps and not report["loss_match"]["ok"]) else 0


if __name__ == "__main__":
    sys.exit(main())
