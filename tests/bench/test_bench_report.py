"""Formatting of a benchmark report on synthetic rows (no GPU, no torch): timings, JSON round trip
(version 1 reports too), Markdown tables parsed back — GEMMs with the compiled baseline, the experts
block against the best grouped_mm row, host overhead, training steps —, row errors, merged reports,
the rich tables, the plot file, and the sanity-check verdicts."""

from __future__ import annotations

import dataclasses
import io
import json
import statistics

import pytest

from moe_tune.bench import report as fmt
from moe_tune.bench.env import header
from moe_tune.bench.results import GEMM_VARIANTS, GROUPED_MM_COMPILED, BlockRow, GemmRow, HostRow, StepRow, Timing
from moe_tune.bench.run_report import BenchReport, merge_reports
from moe_tune.bench.testing import ENVIRONMENT, synthetic_report
from moe_tune.errors import InvalidInputError


def md_tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table in ``text`` as rows of cells (header first, separator dropped)."""
    tables, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if not all(set(c) <= {"-"} for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    return tables


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def test_timing_median_and_spread_from_samples(rng):
    samples = [rng.uniform(0.5, 2.0) for _ in range(rng.randint(1, 60))]
    t = Timing.from_samples(samples)
    assert t.ms == pytest.approx(statistics.median(samples))
    assert t.min == min(samples) and t.n == len(samples)
    assert t.min <= t.p20 <= t.ms <= t.p80 <= max(samples)


def test_timing_quantiles_interpolate_like_triton():
    t = Timing.from_samples([5, 1, 4, 2, 3])  # unsorted on purpose
    assert (t.ms, t.p20, t.p80) == (3, pytest.approx(1.8), pytest.approx(4.2))
    assert t.tflops(3 * 10**9) == pytest.approx(1.0)  # 3 GFLOP in 3 ms


def test_timing_needs_a_sample():
    with pytest.raises(InvalidInputError):
        Timing.from_samples([])


# ---------------------------------------------------------------------------------------------
# JSON
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("skipped, compiled, steps", [
    (None, False, False),  # eager rows only, no training steps (the --no-compile report)
    (None, True, True),  # every section, compiled baselines included
    ("transformers is not installed", True, True),  # block and host skipped, steps present
], ids=["eager", "everything", "block-skipped"])
def test_json_round_trip(rng, skipped, compiled, steps):
    report = synthetic_report(rng, skipped=skipped, compiled=compiled, steps=steps)
    text = fmt.to_json(report)
    assert fmt.from_json(text) == report
    data = json.loads(text)
    assert data["kind"] == "moe-tune-bench" and data["version"] == 2 and data["environment"] == ENVIRONMENT
    assert data["block"]["skipped"] == skipped and data["host"]["skipped"] == skipped
    assert data["step"]["skipped"] == (None if steps else "not requested")


def test_json_round_trip_keeps_row_errors(rng):
    report = with_errors(synthetic_report(rng, compiled=True, steps=True))
    again = fmt.from_json(fmt.to_json(report))
    assert again == report
    assert again.row_errors == report.row_errors and len(report.row_errors) == 4


def test_version_1_reports_still_read(rng):
    # A report written before the compiled baselines, host overhead and training steps existed.
    data = synthetic_report(rng).to_dict()
    data["version"] = 1
    for key in ("host", "step"):
        del data[key]
    for row in data["block"]["rows"]:
        for key in ("error", "note"):
            del row[key]
    for row in data["gemms"]:
        del row["failures"]
    report = BenchReport.from_dict(json.loads(json.dumps(data)))
    assert report.host.skipped == report.step.skipped == "not requested"
    assert [r.implementation for r in report.block.rows[:2]] == ["grouped_mm", "moe_tune"]
    assert fmt.markdown(report)  # formats like any other


def test_json_carries_derived_figures(rng):
    report = synthetic_report(rng)
    data = json.loads(fmt.to_json(report))
    for row, item in zip(report.gemms, data["gemms"]):
        assert (item["tokens"], item["gemm"], item["pass"], item["key"]) == (
            row.tokens, row.problem.gemm, row.problem.pass_, row.problem.key)
        for variant in GEMM_VARIANTS:
            ms = item["timings"][variant]["ms"]
            assert item["tflops"][variant] == pytest.approx(item["flops"] / (ms * 1e-3) / 1e12)
        t = item["timings"]
        assert item["tuned_vs_grouped_mm"] == pytest.approx(t["grouped_mm"]["ms"] / t["tuned"]["ms"])
        assert item["tuned_vs_default"] == pytest.approx(t["default"]["ms"] / t["tuned"]["ms"])
    for item in data["block"]["rows"]:
        if item["implementation"] == "moe_tune":
            base = next(b for b in data["block"]["rows"]
                        if b["tokens"] == item["tokens"] and b["implementation"] == "grouped_mm")
            assert item["best_grouped_mm_fwd_bwd"] == "grouped_mm"  # the only baseline row
            assert item["fwd_bwd_vs_best_grouped_mm"] == pytest.approx(base["fwd_bwd"]["ms"] / item["fwd_bwd"]["ms"])


def test_json_takes_speedups_against_the_best_baseline(rng):
    report = synthetic_report(rng, compiled=True, steps=True)
    data = json.loads(fmt.to_json(report))
    for row, item in zip(report.gemms, data["gemms"]):
        best = min(("grouped_mm", GROUPED_MM_COMPILED), key=lambda v: row.timings[v].ms)
        assert item["best_grouped_mm"] == best
        assert item["tuned_vs_best_grouped_mm"] == pytest.approx(row.timings[best].ms / row.timings["tuned"].ms)
    for item in data["block"]["rows"]:
        baselines = [b for b in data["block"]["rows"]
                     if b["tokens"] == item["tokens"] and b["implementation"].startswith("grouped_mm")]
        fastest = min(baselines, key=lambda b: b["fwd_bwd"]["ms"])
        assert item["best_grouped_mm_fwd_bwd"] == fastest["implementation"]
        assert item["fwd_bwd_vs_best_grouped_mm"] == pytest.approx(fastest["fwd_bwd"]["ms"] / item["fwd_bwd"]["ms"])
    for item in data["step"]["rows"]:
        baselines = [b for b in data["step"]["rows"] if (b["tokens"], b["mode"]) == (item["tokens"], item["mode"])
                     and b["implementation"] == "grouped_mm"]
        fastest = min(baselines, key=lambda b: b["step"]["ms"])
        assert item["vs_best_grouped_mm"] == pytest.approx(fastest["step"]["ms"] / item["step"]["ms"])
        eager = [b for b in baselines if not b["compiled"]]
        if item["compiled"]:
            assert item["vs_grouped_mm_eager"] is None
        else:
            assert item["vs_grouped_mm_eager"] == pytest.approx(eager[0]["step"]["ms"] / item["step"]["ms"])
        assert item["tokens_per_s"] == pytest.approx(item["tokens"] / (item["step"]["ms"] * 1e-3))


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(kind="moe-tune-cache"), "not a moe-tune bench report"),
    (lambda d: d.update(version=99), "version 99"),
    (lambda d: d["gemms"][0].pop("timings"), "malformed GEMM row"),
    (lambda d: d["gemms"][0]["timings"].pop("dense"), "needs timings for dense"),
    (lambda d: d["block"]["rows"][0].update(fwd=None), "needs its timings or an error"),
    (lambda d: d["step"]["rows"][0].pop("mode"), "malformed training-step row"),
], ids=["wrong-kind", "future-version", "no-timings", "missing-variant", "block-row-without-timing",
        "step-row-without-mode"])
def test_from_json_refuses_malformed_reports(rng, mutate, message):
    data = synthetic_report(rng, steps=True).to_dict()
    mutate(data)
    with pytest.raises(InvalidInputError, match=message):
        BenchReport.from_dict(json.loads(json.dumps(data)))


# ---------------------------------------------------------------------------------------------
# Markdown
# ---------------------------------------------------------------------------------------------


def test_markdown_header_names_card_driver_and_versions(rng):
    text = fmt.markdown(synthetic_report(rng))
    lines = text.splitlines()
    assert lines[0].startswith("## moe-tune bench: qwen3-30b-a3b (E=128, H=2048, I=768, k=8), bfloat16")
    env_line = lines[2]
    for value in ("**NVIDIA H200**", "driver 580.159.04", "torch 2.11.0+cu130", "Triton 3.6.0", "CUDA 13.0",
                  "transformers 5.17.0", "2026-11-27"):
        assert value in env_line
    assert "warmup 25 ms, rep 100 ms" in text


def test_markdown_tables_parse_back_to_the_rows(rng):
    report = synthetic_report(rng, tokens=(1024, 4096, 16384))
    throughput, times, configs, summary, block, host = md_tables(fmt.markdown(report))
    assert throughput[0] == list(fmt.throughput_columns(report)) and len(throughput) == 1 + 18
    assert "grouped_mm+compile TFLOP/s" not in throughput[0] and "tuned / grouped_mm" in throughput[0]
    assert times[0] == list(fmt.times_columns(report)) and configs[0] == list(fmt.CONFIG_COLUMNS)
    for row, cells, time_cells, config_cells in zip(report.gemms, throughput[1:], times[1:], configs[1:]):
        assert cells[:3] == [str(row.tokens), row.problem.gemm, row.problem.pass_]
        for variant, cell in zip(GEMM_VARIANTS, cells[3:7]):
            assert float(cell) == pytest.approx(row.tflops(variant), rel=0.05, abs=0.5)
        assert cells[7] == f"{row.speedup('tuned', 'grouped_mm'):.2f}x"
        assert cells[8] == f"{row.speedup('tuned', 'default'):.2f}x"
        median, spread = time_cells[3].split(" ", 1)
        assert float(median) == pytest.approx(row.timings["tuned"].ms, rel=1e-3)
        p20, p80 = (float(v) for v in spread.strip("[]").split(", "))
        assert p20 <= float(median) <= p80
        if row.tuned_from.from_cache:
            assert config_cells[3] == row.tuned_config.short()
            assert config_cells[4] == f"user cache, bucket {row.tokens}"
        else:
            assert config_cells[3] == "= default" and config_cells[4] == "no cache: heuristic default"
        assert config_cells[5] == row.default_config.short()
    assert block[0] == list(fmt.BLOCK_COLUMNS) and len(block) == 1 + 6
    assert [c[1] for c in block[1:3]] == ["transformers grouped_mm", "moe-tune"]
    assert block[1][7] == "(reference)" and block[1][6] == "1.00x"
    assert summary[0] == ["T", "transformers grouped_mm", "moe-tune", "best moe-tune vs best grouped_mm"]
    assert [row[0] for row in summary[1:]] == ["1024", "4096", "16384"]
    assert host[0] == list(fmt.HOST_COLUMNS) and len(host) == 1 + 2


def test_markdown_compiled_baselines_and_best_speedups(rng):
    report = synthetic_report(rng, compiled=True)
    throughput, times, _, summary, block, host = md_tables(fmt.markdown(report))
    column = throughput[0].index("grouped_mm+compile TFLOP/s")
    best = throughput[0].index("tuned / best grouped_mm")
    for row, cells in zip(report.gemms, throughput[1:]):
        assert float(cells[column]) == pytest.approx(row.tflops(GROUPED_MM_COMPILED), rel=0.05, abs=0.5)
        assert cells[best] == f"{row.speedup('tuned', row.best_baseline):.2f}x"
    assert "grouped_mm+compile ms" in times[0]
    assert summary[0][1:5] == ["transformers grouped_mm", "transformers grouped_mm + compile", "moe-tune",
                               "moe-tune + compile"]
    for cells in summary[1:]:
        T = int(cells[0])
        rows = [r for r in report.block.rows if r.tokens == T]
        assert [float(c) for c in cells[1:5]] == pytest.approx([r.fwd_bwd.ms for r in rows], rel=1e-3)
        base = min(r.fwd_bwd.ms for r in rows if r.implementation.startswith("grouped_mm"))
        ours = min(r.fwd_bwd.ms for r in rows if r.implementation.startswith("moe_tune"))
        assert cells[5].startswith(f"{base / ours:.2f}x (moe-tune")
    speedups = {(c[0], c[1]): c[6] for c in block[1:]}
    assert "1.00x" in {speedups[(str(T), "transformers grouped_mm")] for T in report.tokens} | {
        speedups[(str(T), "transformers grouped_mm + compile")] for T in report.tokens}
    assert [c[0] for c in host[1:]] == ["transformers grouped_mm", "transformers grouped_mm + compile", "moe-tune",
                                        "moe-tune + compile"]
    assert "torch.compile backend inductor" in fmt.markdown(report)


def test_markdown_training_steps(rng):
    report = synthetic_report(rng, compiled=True, steps=True)
    text = fmt.markdown(report)
    steps = md_tables(text)[-1]
    assert steps[0] == list(fmt.STEP_COLUMNS) and len(steps) == 1 + len(report.step.rows)
    for row, cells in zip(report.step.rows, steps[1:]):
        assert cells[:3] == [str(row.tokens), fmt.MODE_LABELS[row.mode], fmt.BLOCK_LABELS[row.label]]
        assert float(cells[3].split(" ")[0]) == pytest.approx(row.step.ms, rel=1e-3)
        assert float(cells[4].replace(",", "")) == pytest.approx(row.tokens_per_s, abs=1)
        assert float(cells[7]) == pytest.approx(row.loss, abs=1e-5)
        assert cells[8] == f"{report.step.speedup(row):.2f}x"
        eager = next(r for r in report.step.rows if (r.tokens, r.mode, r.label) == (row.tokens, row.mode, "grouped_mm"))
        assert cells[9] == ("-" if row.compiled else f"{eager.step.ms / row.step.ms:.2f}x")
    assert "vocabulary 16384 (kept moderate so the LM head does not dominate)" in text
    assert "LoRA r=16" in text and "experts 55%" in text
    # Every section that BENCHMARKS.md takes whole repeats the card and date under its heading.
    for heading in ("### Experts block against the strongest baseline", "### Host overhead", "### Training steps"):
        after = text.split(heading, 1)[1].lstrip("\n").splitlines()[0]
        assert after == f"*{header(ENVIRONMENT)}*"


def test_step_loss_disagreement_is_a_failed_check(rng):
    report = synthetic_report(rng, steps=True)
    rows = list(report.step.rows)
    i = next(i for i, r in enumerate(rows) if r.implementation == "moe_tune" and r.mode == "lora")
    rows[i] = dataclasses.replace(rows[i], loss=rows[i].loss * 1.02)
    report = dataclasses.replace(report, step=dataclasses.replace(report.step, rows=tuple(rows)))
    assert report.step.failed_losses == [rows[i]]
    assert len(report.failed_checks) == 1 and "lora training step moe_tune (first-step loss" in report.failed_checks[0]
    cells = md_tables(fmt.markdown(report))[-1][1 + i]
    assert cells[7].startswith("FAILED") and "rel. diff 2.0e-02" in cells[7]


def test_step_nan_loss_fails(rng):
    report = synthetic_report(rng, steps=True)
    rows = list(report.step.rows)
    rows[1] = dataclasses.replace(rows[1], loss=float("nan"))
    section = dataclasses.replace(report.step, rows=tuple(rows))
    assert section.failed_losses == [rows[1]]


def with_errors(report):
    """``report`` with one failed row of each kind: a compiled GEMM baseline, a compiled moe-tune
    block, a compiled grouped_mm host row and a moe-tune training step."""
    gemm = dataclasses.replace(report.gemms[0], timings={k: v for k, v in report.gemms[0].timings.items()
                                                         if k != GROUPED_MM_COMPILED},
                               failures={GROUPED_MM_COMPILED: "BackendCompilerFailed: boom"})
    block = list(report.block.rows)
    i = next(i for i, r in enumerate(block) if r.implementation == "moe_tune+compile")
    block[i] = BlockRow(block[i].tokens, block[i].implementation, None, None, error="Unsupported: graph break",
                        note="fullgraph=False (Unsupported: .item())")
    host = list(report.host.rows)
    host[1] = HostRow(host[1].implementation, None, None, error="OutOfMemoryError: CUDA out of memory")
    steps = list(report.step.rows)
    j = next(j for j, r in enumerate(steps) if r.implementation == "moe_tune" and r.compiled)
    steps[j] = StepRow(steps[j].tokens, steps[j].mode, "moe_tune", True, None, error="AssertionError: guard failed")
    return dataclasses.replace(report, gemms=(gemm, *report.gemms[1:]),
                               block=dataclasses.replace(report.block, rows=tuple(block)),
                               host=dataclasses.replace(report.host, rows=tuple(host)),
                               step=dataclasses.replace(report.step, rows=tuple(steps)))


def test_row_errors_are_reported_not_fatal(rng):
    report = with_errors(synthetic_report(rng, compiled=True, steps=True))
    where = [(w, impl) for w, impl, _ in report.row_errors]
    assert len(where) == 4
    # Only moe-tune's failures fail the run; a baseline that could not run is a row error.
    assert [f for f in report.failed_checks if "failed" in f] == [
        f for f in report.failed_checks if "moe_tune" in f]
    assert len(report.failed_checks) == 2
    text = fmt.markdown(report)
    assert "grouped_mm+compile failed: BackendCompilerFailed: boom" in text
    tables = md_tables(text)
    block = tables[4]
    failed = next(c for c in block[1:] if c[1] == "moe-tune + compile" and c[2] == "-")
    assert failed[8] == "FAILED: Unsupported: graph break; fullgraph=False (Unsupported: .item())"
    assert tables[0][1][tables[0][0].index("grouped_mm+compile TFLOP/s")] == "failed"
    assert tables[3][1][4] == "failed"  # the summary's moe-tune + compile cell at the first T
    assert tables[5][2][5] == "FAILED: OutOfMemoryError: CUDA out of memory"
    assert any(c[11] == "FAILED: AssertionError: guard failed" for c in tables[6][1:])


def test_a_row_needs_timings_or_an_error():
    with pytest.raises(InvalidInputError, match="experts-block row"):
        BlockRow(16, "moe_tune", None, None)
    with pytest.raises(InvalidInputError, match="training-step row"):
        StepRow(16, "full", "moe_tune", False, None)
    assert StepRow(16, "full", "moe_tune", False, None, error="x").tokens_per_s is None


# ---------------------------------------------------------------------------------------------
# Merging reports of separate runs
# ---------------------------------------------------------------------------------------------


def test_merge_takes_each_section_from_the_run_that_measured_it(rng):
    full = synthetic_report(rng, compiled=True, steps=True)
    gemms_only = dataclasses.replace(full, step=dataclasses.replace(full.step, rows=(), skipped="not requested"))
    steps_only = dataclasses.replace(full, gemms=(), block=dataclasses.replace(full.block, rows=(), skipped="x"),
                                     host=dataclasses.replace(full.host, rows=(), skipped="x"))
    merged = merge_reports([gemms_only, steps_only])
    assert merged.gemms == full.gemms and merged.block == full.block and merged.host == full.host
    assert merged.step.rows == full.step.rows and merged.step.model == full.step.model
    assert fmt.markdown(merged) == fmt.markdown(full)


def test_merge_concatenates_step_modes_and_drops_their_skips(rng):
    report = synthetic_report(rng, steps=True)
    lora = tuple(r for r in report.step.rows if r.mode == "lora")
    first = dataclasses.replace(report, step=dataclasses.replace(
        report.step, rows=tuple(r for r in report.step.rows if r.mode != "lora"),
        mode_skipped={"lora": "not requested"}))
    second = dataclasses.replace(report, gemms=(), step=dataclasses.replace(report.step, rows=lora))
    merged = merge_reports([first, second])
    assert merged.step.rows == report.step.rows  # back in (T, mode) order
    assert merged.step.mode_skipped == {}


def test_merge_of_runs_split_by_token_count(rng):
    report = synthetic_report(rng, compiled=True, steps=True)
    parts = [dataclasses.replace(
        report, tokens=(T,), gemms=tuple(g for g in report.gemms if g.tokens == T),
        block=dataclasses.replace(report.block, rows=tuple(r for r in report.block.rows if r.tokens == T)),
        step=dataclasses.replace(report.step, rows=tuple(r for r in report.step.rows if r.tokens == T)))
        for T in reversed(report.tokens)]
    merged = merge_reports(parts)
    assert merged.tokens == tuple(reversed(report.tokens))
    assert {r.tokens for r in merged.gemms} == set(report.tokens) and len(merged.step.rows) == len(report.step.rows)
    assert [r.tokens for r in merged.step.rows][0] == report.tokens[-1]  # the first run's token count leads


def test_merge_refuses_different_cards(rng):
    a = synthetic_report(rng)
    b = dataclasses.replace(a, environment={**a.environment, "card": "NVIDIA H100 80GB HBM3"})
    with pytest.raises(InvalidInputError, match="different cards"):
        merge_reports([a, b])


def test_markdown_says_why_the_block_was_skipped(rng):
    text = fmt.markdown(synthetic_report(rng, skipped="mixtral-8x7b is a mixtral model"))
    assert text.count("skipped: mixtral-8x7b is a mixtral model") == 2  # block and host overhead
    assert "### Training steps" in text and "skipped: not requested" in text
    assert len(md_tables(text)) == 3  # the three GEMM tables, no block table


def test_failed_check_is_flagged_everywhere(rng):
    report = synthetic_report(rng)
    bad = dataclasses.replace(report.gemms[3], errors={"default": 0.9, "tuned": 1e-3})
    report = dataclasses.replace(report, gemms=(*report.gemms[:3], bad, *report.gemms[4:]))
    assert report.failed_checks == [f"T={bad.tokens} down forward (default config)"]
    configs = md_tables(fmt.markdown(report))[2]
    assert configs[1 + 3][6] == "FAILED 9.0e-01"
    assert fmt.from_json(fmt.to_json(report)).failed_checks == report.failed_checks


def test_a_nan_error_fails_the_check(rng):
    row = synthetic_report(rng).gemms[0]
    assert dataclasses.replace(row, errors={"default": float("nan")}).failed_checks == ["default"]
    assert dataclasses.replace(row, errors={"default": float("inf")}).failed_checks == ["default"]


def test_gemm_row_requires_every_variant(rng):
    row = synthetic_report(rng).gemms[0]
    with pytest.raises(InvalidInputError, match="grouped_mm"):
        GemmRow(row.tokens, row.problem, row.tuned_config, row.tuned_from, row.default_config,
                {k: v for k, v in row.timings.items() if k != "grouped_mm"})


# ---------------------------------------------------------------------------------------------
# Rich tables
# ---------------------------------------------------------------------------------------------


def test_rich_report_shows_header_tables_and_sources(rng):
    from rich.console import Console

    report = synthetic_report(rng)
    out = io.StringIO()
    fmt.print_report(report, Console(file=out, width=250, color_system=None))
    text = out.getvalue()
    assert header(ENVIRONMENT) in text
    assert "median ms [p20, p80]" in text  # square brackets survive rich markup
    for title in ("grouped GEMMs: throughput", "grouped GEMMs: times", "grouped GEMMs: configs", "experts block",
                  "host overhead per experts-block fwd+bwd, T=128"):
        assert title in text
    assert "training steps: skipped: not requested" in text
    assert "tuned configs read from /cache/nvidia-h200__triton-3.6.0.json" in text
    row = report.gemms[0]
    assert f"{row.speedup('tuned', 'grouped_mm'):.2f}x" in text


def test_rich_report_shows_training_steps_and_errors(rng):
    from rich.console import Console

    report = with_errors(synthetic_report(rng, compiled=True, steps=True))
    out = io.StringIO()
    fmt.print_report(report, Console(file=out, width=400, color_system=None))
    text = out.getvalue()
    assert "training steps (forward, backward, AdamW)" in text and "LoRA on experts" in text
    assert "FAILED: AssertionError: guard failed" in text
    assert "experts block fwd+bwd against the strongest baseline" in text


def test_rich_report_says_skipped(rng):
    from rich.console import Console

    out = io.StringIO()
    fmt.print_report(synthetic_report(rng, skipped="no [transformers]"), Console(file=out, width=250))
    assert "experts block: skipped: no [transformers]" in out.getvalue()
    assert "host overhead: skipped: no [transformers]" in out.getvalue()


# ---------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compiled", [False, True], ids=["four-lines", "with-compiled-baseline"])
def test_plot_has_one_panel_per_problem_and_a_line_per_variant(rng, compiled):
    pytest.importorskip("matplotlib")
    report = synthetic_report(rng, tokens=(1024, 4096, 16384), compiled=compiled)
    fig = fmt.plot_figure(report)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 6
    for ax, row in zip(panels, report.gemms[:6]):
        assert ax.get_title().startswith(f"{row.problem.gemm} {row.problem.pass_}")
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == set(GEMM_VARIANTS) | ({"grouped_mm+compile"} if compiled else set())
        assert list(lines["tuned"].get_xdata()) == [1024, 4096, 16384]
        assert lines["tuned"].get_ydata()[0] == pytest.approx(row.tflops("tuned"))
    assert "NVIDIA H200" in fig._suptitle.get_text() and "Triton 3.6.0" in fig._suptitle.get_text()


def test_plot_file_is_a_png(rng, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    path.write_bytes(b"stale")
    fmt.write_plot(synthetic_report(rng), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["bench.png"]  # no temporary file left behind
