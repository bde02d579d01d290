"""Formatting of a benchmark report on synthetic rows (no GPU, no torch): timings, JSON round trip,
Markdown tables parsed back, the rich tables, the plot file, and the sanity-check verdicts."""

from __future__ import annotations

import dataclasses
import io
import json
import statistics

import pytest

from moe_tune.bench import report as fmt
from moe_tune.bench.env import header
from moe_tune.bench.results import GEMM_VARIANTS, BenchReport, GemmRow, Timing
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


@pytest.mark.parametrize("skipped", [None, "transformers is not installed"], ids=["with-block", "block-skipped"])
def test_json_round_trip(rng, skipped):
    report = synthetic_report(rng, skipped=skipped)
    text = fmt.to_json(report)
    assert fmt.from_json(text) == report
    data = json.loads(text)
    assert data["kind"] == "moe-tune-bench" and data["environment"] == ENVIRONMENT
    assert data["block"]["skipped"] == skipped


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
            assert item["fwd_bwd_vs_grouped_mm"] == pytest.approx(base["fwd_bwd"]["ms"] / item["fwd_bwd"]["ms"])


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d.update(kind="moe-tune-cache"), "not a moe-tune bench report"),
    (lambda d: d.update(version=99), "version 99"),
    (lambda d: d["gemms"][0].pop("timings"), "malformed GEMM row"),
    (lambda d: d["gemms"][0]["timings"].pop("dense"), "needs timings for dense"),
], ids=["wrong-kind", "future-version", "no-timings", "missing-variant"])
def test_from_json_refuses_malformed_reports(rng, mutate, message):
    data = synthetic_report(rng).to_dict()
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
    throughput, times, configs, block = md_tables(fmt.markdown(report))
    assert throughput[0] == list(fmt.THROUGHPUT_COLUMNS) and len(throughput) == 1 + 18
    assert times[0] == list(fmt.TIMES_COLUMNS) and configs[0] == list(fmt.CONFIG_COLUMNS)
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
    assert block[1][7] == "(baseline)" and block[1][6] == "1.00x"


def test_markdown_says_why_the_block_was_skipped(rng):
    text = fmt.markdown(synthetic_report(rng, skipped="mixtral-8x7b is a mixtral model"))
    assert "skipped: mixtral-8x7b is a mixtral model" in text
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
    for title in ("grouped GEMMs: throughput", "grouped GEMMs: times", "grouped GEMMs: configs", "experts block"):
        assert title in text
    assert "tuned configs read from /cache/nvidia-h200__triton-3.6.0.json" in text
    row = report.gemms[0]
    assert f"{row.speedup('tuned', 'grouped_mm'):.2f}x" in text


def test_rich_report_says_skipped(rng):
    from rich.console import Console

    out = io.StringIO()
    fmt.print_report(synthetic_report(rng, skipped="no [transformers]"), Console(file=out, width=250))
    assert "experts block: skipped: no [transformers]" in out.getvalue()


# ---------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------


def test_plot_has_one_panel_per_problem_and_four_lines(rng):
    pytest.importorskip("matplotlib")
    report = synthetic_report(rng, tokens=(1024, 4096, 16384))
    fig = fmt.plot_figure(report)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 6
    for ax, row in zip(panels, report.gemms[:6]):
        assert ax.get_title().startswith(f"{row.problem.gemm} {row.problem.pass_}")
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert set(lines) == set(GEMM_VARIANTS)
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
