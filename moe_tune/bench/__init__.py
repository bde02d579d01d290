"""Benchmarks of the tuned kernels: what ``moe-tune bench`` and ``benchmarks/bench_*.py`` run.

Data flow: ``run.run_bench(BenchOptions, timer, progress)`` →

* ``env`` — card, driver, torch, Triton, CUDA, transformers versions (named beside every figure);
* ``gemms`` — per token count, the six problems of the model's MoE layer, each run with the tuned
  config (``runtime.explain``: cache, else the heuristic default), the heuristic default,
  ``torch._grouped_mm`` with the permutes its layout needs, and a dense matmul of the same FLOPs;
* ``block`` — the experts block under moe-tune's kernels against transformers' ``grouped_mm``
  (Qwen3-MoE family; otherwise the reason it is skipped);
* ``timing`` — ``do_bench`` on CUDA, the wall clock under Triton's interpreter; nothing is timed
  while compiling or warming up;

→ ``results.BenchReport`` (plain data, JSON round trip) → ``report``: rich tables, Markdown, JSON,
a TFLOP/s plot. ``testing`` builds synthetic reports for CPU tests.

Importing this package imports nothing heavy; ``gemms`` and ``timing``'s timers load torch and
triton, ``block`` loads transformers inside its functions, ``report`` matplotlib only to plot.
"""
