"""Benchmarks of the tuned kernels: what ``moe-tune bench`` and ``benchmarks/bench_*.py`` run.

Every speed-up is taken against the strongest baseline a user has without moe-tune: the faster
of ``torch._grouped_mm`` / transformers' ``grouped_mm`` eager and under ``torch.compile``.

Data flow: ``run.run_bench(BenchOptions, timer, progress, checkpoint)`` →

* ``env`` — card, driver, torch, Triton, CUDA, transformers versions (named beside every figure);
* ``gemms`` — per token count, the six problems of the model's MoE layer, each run with the tuned
  config (``runtime.explain``: cache, else the heuristic default), the heuristic default,
  ``torch._grouped_mm`` with the permutes its layout needs (eager, and compiled), and a dense
  matmul of the same FLOPs;
* ``block`` — the experts block under moe-tune's kernels against transformers' ``grouped_mm``,
  each eager and compiled (Qwen3-MoE family; otherwise the reason it is skipped);
* ``host`` — the block's host time and GPU launches per fwd+bwd at a small token count;
* ``lm`` and ``step`` — an N-layer causal LM of the preset's family, trained (forward, backward,
  AdamW) in three modes — full, experts frozen, LoRA on the experts — per implementation, eager
  and compiled;
* ``timing`` — ``do_bench`` on CUDA, the wall clock under Triton's interpreter (GEMMs, block);
  ``host`` and ``step`` time with the host clock and a device synchronise; nothing is timed while
  compiling or warming up;
* ``isolation`` — a failed measurement becomes a row error and the device is cleared after it;

→ ``run_report.BenchReport`` (plain data, JSON round trip, ``merge_reports`` for runs of separate
sections) → ``report``: rich tables, Markdown, JSON, a TFLOP/s plot. ``testing`` builds
synthetic reports for CPU tests.

Importing this package imports nothing heavy; ``gemms`` and ``timing``'s timers load torch and
triton, ``block``, ``lm`` and ``step`` load transformers (and PEFT) inside their functions,
``report`` matplotlib only to plot.
"""
