"""GPU benchmark of the gpt-oss experts block: moe-tune against transformers' ``grouped_mm`` experts
implementation for ``GptOssExperts``, eager and under ``torch.compile`` (the strongest baseline),
fwd+bwd and forward alone, with peak memory; then a 2-layer gpt-oss training step. Random weights,
nothing downloaded.

    PYTHONPATH=. python3 benchmarks/bench_gptoss.py --out DIR [--presets gpt-oss-20b gpt-oss-120b]
        [--tokens 4096 16384] [--compile-moe-tune] [--no-step | --step-compile] [--no-block]

Writes ``DIR/bench_gptoss.json`` (every number, the environment) and ``DIR/bench_gptoss.md`` (the
tables). Block timings: ``triton.testing.do_bench`` (L2 flushed, median and p20-p80 of the runs),
inputs and routing built outside the timed function; each implementation's output and gradients are
compared once against eager ``grouped_mm``. The training step: forward, loss, backward and an
AdamW step, synchronised, median of several steps after warm-up, with the host time (before the
synchronise) beside it to show whether the step is host-bound. The default run takes ~5 minutes on
one H100 (most of it compiling: Inductor for the baseline, Triton for each preset's E).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from triton.testing import do_bench

from moe_tune.bench.env import environment, header
from moe_tune.integrations.transformers import register

# name: (E, H, I, k), the released models' expert shapes (configs/models/gpt-oss-*.json)
PRESETS = {"gpt-oss-20b": (32, 2880, 2880, 4), "gpt-oss-120b": (128, 2880, 2880, 4)}
DTYPE = torch.bfloat16


def gpt_oss_config(E, H, I, k, **fields):
    from transformers import GptOssConfig

    base = dict(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=k, num_hidden_layers=1,
                num_attention_heads=64, num_key_value_heads=8, head_dim=64, vocab_size=201088)
    return GptOssConfig(**{**base, **fields})


def block_flops(E, H, I, k, T) -> int:
    """fwd+bwd of both GEMMs: 3 passes × 2·M·(2I·H + I·H)."""
    return 3 * 2 * T * k * 3 * I * H


# -------------------------------------------------------------------------------------------------
# Experts block
# -------------------------------------------------------------------------------------------------


def build_mlp(E, H, I, k, seed=0):
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    torch.manual_seed(seed)
    mlp = GptOssMLP(gpt_oss_config(E, H, I, k))
    # Weights at a scale where the pre-activations cross the clamps (std ~ 3.5 on x ~ N(0, 1)),
    # so timing runs the clamped branches as training does.
    for name, p in mlp.named_parameters():
        fan_in = H if name in ("experts.gate_up_proj", "router.weight") else I
        torch.nn.init.normal_(p, std=(1.0 if name.endswith("bias") else 3.5 / fan_in**0.5))
    return mlp.to("cuda", DTYPE)


def peak_mib(fn) -> float:
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def bench(fn, leaves, rep) -> dict:
    p20, p50, p80 = do_bench(fn, warmup=10, rep=rep, grad_to_none=leaves, quantiles=[0.2, 0.5, 0.8])
    return {"ms": p50, "spread_ms": p80 - p20}


def time_block(name, E, H, I, k, T, impls, results) -> None:
    mlp = build_mlp(E, H, I, k)
    experts = mlp.experts
    gen = torch.Generator(device="cuda").manual_seed(T)
    x = torch.randn(T, H, generator=gen, device="cuda", dtype=DTYPE)
    with torch.no_grad():
        _, top_k_weights, top_k_index = mlp.router(x)
    x.requires_grad_()
    top_k_weights = top_k_weights.detach().requires_grad_()
    grad = torch.randn(T, H, generator=gen, device="cuda", dtype=DTYPE)
    leaves = [x, top_k_weights, *experts.parameters()]
    rows, ref = {}, None
    for impl in impls:
        torch._dynamo.reset()
        experts.config._experts_implementation = "grouped_mm" if impl.startswith("grouped_mm") else "moe_tune"
        module = torch.compile(experts, fullgraph=True) if impl.endswith("+compile") else experts

        def fwd_bwd():
            module(x, top_k_index, top_k_weights).backward(grad)

        def fwd():
            with torch.no_grad():
                module(x, top_k_index, top_k_weights)

        try:
            start = time.perf_counter()
            for t in leaves:
                t.grad = None
            out = module(x, top_k_index, top_k_weights)
            out.backward(grad)
            torch.cuda.synchronize()
            first_s = time.perf_counter() - start  # compiles (Inductor, Triton) and cache lookups
            got = [out.detach().float()] + [t.grad.float() for t in leaves]
            if ref is None:
                ref, err = got, 0.0
            else:
                err = max(((a - b).norm() / b.norm().clamp_min(1e-30)).item() for a, b in zip(got, ref))
            del out, got
            for t in leaves:
                t.grad = None
            row = {"first_call_s": first_s, "peak_mib": peak_mib(fwd_bwd), "max_rel_err_vs_grouped_mm": err}
            row["fwd_bwd"] = bench(fwd_bwd, leaves, rep=200)
            row["fwd"] = bench(fwd, leaves, rep=100)
            row["tflops"] = block_flops(E, H, I, k, T) / row["fwd_bwd"]["ms"] / 1e9
            rows[impl] = row
        except Exception as exc:  # one failing implementation must not lose the others' numbers
            rows[impl] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print(f"block {name} T={T} {impl:<20} {rows[impl]}", flush=True)
    results["block"][f"{name}/T{T}"] = {"shape": {"E": E, "H": H, "I": I, "k": k, "T": T}, "impls": rows}
    del mlp, experts, leaves, ref
    torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------------------
# Training step
# -------------------------------------------------------------------------------------------------


def time_step(name, E, H, I, k, batch, seq, vocab, impls, results, steps=8, warmup=3) -> None:
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssForCausalLM

    rows = {}
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq), generator=gen, device="cuda")
    for impl in impls:
        torch._dynamo.reset()
        torch.manual_seed(0)
        # Eager attention (gpt-oss has no SDPA path: its sinks); short sequences keep it small.
        model = GptOssForCausalLM(gpt_oss_config(E, H, I, k, num_hidden_layers=2, vocab_size=vocab,
                                                 max_position_embeddings=max(4096, seq)))
        model = model.to("cuda", DTYPE).train()
        model.set_experts_implementation("grouped_mm" if impl.startswith("grouped_mm") else "moe_tune")
        run = torch.compile(model, fullgraph=False) if impl.endswith("+compile") else model
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)

        def step():
            loss = run(input_ids=ids, labels=ids, use_cache=False).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            return loss

        try:
            for _ in range(warmup):
                step()
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            host, wall = [], []
            for _ in range(steps):
                start = time.perf_counter()
                step()
                host.append((time.perf_counter() - start) * 1e3)
                torch.cuda.synchronize()
                wall.append((time.perf_counter() - start) * 1e3)
            rows[impl] = {"step_ms": statistics.median(wall), "spread_ms": max(wall) - min(wall),
                          "host_ms": statistics.median(host), "peak_mib": torch.cuda.max_memory_allocated() / 2**20}
        except Exception as exc:
            rows[impl] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
        print(f"step {name} {batch}x{seq} {impl:<20} {rows[impl]}", flush=True)
        del model, run, opt
        torch.cuda.empty_cache()
    results["step"][name] = {"layers": 2, "batch": batch, "seq": seq, "vocab": vocab, "impls": rows}


# -------------------------------------------------------------------------------------------------
# Report
# -------------------------------------------------------------------------------------------------


def markdown(results) -> str:
    lines = ["# gpt-oss experts block: moe-tune vs transformers grouped_mm", "", header(results["env"]), ""]
    lines += ["## Experts block (bf16)", "",
              "| shape | T | impl | fwd+bwd ms (p20-p80) | fwd ms | TFLOP/s | peak MiB | speed-up vs best grouped_mm | rel err |",
              "|---|---|---|---|---|---|---|---|---|"]
    for key, entry in results["block"].items():
        name, T = key.split("/T")
        rows = entry["impls"]
        best = min((r["fwd_bwd"]["ms"] for i, r in rows.items() if i.startswith("grouped_mm") and "fwd_bwd" in r),
                   default=float("nan"))
        for impl, r in rows.items():
            if "error" in r:
                lines.append(f"| {name} | {T} | {impl} | error: {r['error'][:80]} | | | | | |")
                continue
            fb = r["fwd_bwd"]
            lines.append(f"| {name} | {T} | {impl} | {fb['ms']:.3f} (±{fb['spread_ms'] / 2:.3f}) | {r['fwd']['ms']:.3f} | "
                         f"{r['tflops']:.0f} | {r['peak_mib']:.0f} | {best / fb['ms']:.2f}x | "
                         f"{r['max_rel_err_vs_grouped_mm']:.1e} |")
    if results["step"]:
        lines += ["", "## 2-layer gpt-oss training step (fwd, loss, bwd, AdamW; bf16)", "",
                  "| shape | tokens | impl | step ms (spread) | host ms | peak MiB | speed-up vs best grouped_mm |",
                  "|---|---|---|---|---|---|---|"]
        for name, entry in results["step"].items():
            rows = entry["impls"]
            base = min((r["step_ms"] for i, r in rows.items() if i.startswith("grouped_mm") and "step_ms" in r),
                       default=float("nan"))
            for impl, r in rows.items():
                tokens = f"{entry['batch']}x{entry['seq']}"
                if "error" in r:
                    lines.append(f"| {name} | {tokens} | {impl} | error: {r['error'][:80]} | | | |")
                    continue
                lines.append(f"| {name} | {tokens} | {impl} | {r['step_ms']:.2f} ({r['spread_ms']:.2f}) | "
                             f"{r['host_ms']:.2f} | {r['peak_mib']:.0f} | {base / r['step_ms']:.2f}x |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="directory for bench_gptoss.json and bench_gptoss.md")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--compile-moe-tune", action="store_true",
                        help="also time moe-tune under torch.compile (its torch.library ops; adds Inductor compiles)")
    parser.add_argument("--no-step", action="store_true", help="skip the 2-layer training step")
    parser.add_argument("--step-compile", action="store_true",
                        help="also time the training step under torch.compile, grouped_mm's and moe-tune's")
    parser.add_argument("--no-block", action="store_true", help="skip the experts-block timings")
    parser.add_argument("--step-batch", type=int, default=8)
    parser.add_argument("--step-seq", type=int, default=512)
    parser.add_argument("--step-vocab", type=int, default=201088, help="gpt-oss's vocabulary by default")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gptoss.py needs a CUDA GPU")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    register()
    results = {"env": environment(), "block": {}, "step": {}, "args": vars(args)}
    print(header(results["env"]), flush=True)
    impls = ["grouped_mm", "grouped_mm+compile", "moe_tune"] + (["moe_tune+compile"] if args.compile_moe_tune else [])
    started = time.perf_counter()
    for name in args.presets if not args.no_block else ():
        for T in args.tokens:
            time_block(name, *PRESETS[name], T, impls, results)
    if not args.no_step:
        E, H, I, k = PRESETS[args.presets[0]]
        step_impls = ["grouped_mm", "moe_tune"]
        if args.step_compile:
            step_impls += ["grouped_mm+compile", "moe_tune+compile"]
        time_step(args.presets[0], E, H, I, k, args.step_batch, args.step_seq, args.step_vocab, step_impls, results)
    results["seconds"] = time.perf_counter() - started
    (out / "bench_gptoss.json").write_text(json.dumps(results, indent=1, default=str))
    report = markdown(results)
    (out / "bench_gptoss.md").write_text(report)
    print("\n" + report, flush=True)
    print(f"{results['seconds']:.0f} s; wrote {out / 'bench_gptoss.json'} and {out / 'bench_gptoss.md'}", flush=True)


if __name__ == "__main__":
    main()
