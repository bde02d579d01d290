"""``moe-tune bench`` through the real entry point: the no-GPU and bad-input paths (exit 2, one
line on stderr, nothing timed), ``--plot`` without matplotlib, a whole run under ``--interpret``
(JSON on stdout parsed back, Markdown, PNG and the ``--output`` JSON written), the training-step
section under ``--interpret --step``, saved reports formatted and merged with ``--from``, and the
text tables; the CLI stays importable without torch."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

import random

from moe_tune.bench import report as fmt
from moe_tune.bench.run_report import BenchReport
from moe_tune.bench.testing import synthetic_report
from moe_tune.cli.bench import _token_counts
from moe_tune.errors import InvalidInputError

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None


def one_line_error(result, code: int = 2) -> str:
    assert result.code == code, (result.code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-tune: error: "), result.stderr
    return lines[0]


@NO_GPU
@pytest.mark.parametrize("args", [
    ["--model", "qwen3-30b-a3b"],
    ["--model", "qwen3-30b-a3b", "--tokens", "4096", "16384", "--json"],  # the spelling
    ["--model", "mixtral-8x7b", "--tokens", "4k,16k", "--no-block"],
], ids=["defaults", "tokens-as-list", "tokens-comma-k"])
def test_no_gpu_exits_2_with_one_line(cli, args, tmp_path):
    md = tmp_path / "report.md"
    line = one_line_error(cli("bench", *args, "--markdown", md))
    assert line.startswith("moe-tune: error: no CUDA GPU is visible: `moe-tune bench` times kernels")
    assert "--interpret" in line
    assert not md.exists()


@pytest.mark.parametrize("args, message", [
    ([], "--model is required"),
    (["--model", "qwen3-31b"], "unknown model 'qwen3-31b'"),
    (["--model", "tiny", "--tokens", "4096,abc"], "cannot read 'abc'"),
    (["--model", "tiny", "--tokens", "0"], "--tokens must be positive"),
    (["--interpret", "--dtype", "bfloat16"], "--interpret runs float32 only"),
    (["--model", "tiny", "--dtype", "int8"], "--dtype must be"),
    (["--model", "tiny", "--markdown", "no/such/folder/report.md"], "folder no/such/folder does not exist"),
    (["--model", "tiny", "--output", "no/such/folder/report.json"], "folder no/such/folder does not exist"),
    (["--model", "tiny", "--step-modes", "full,qlora"], "--step-modes takes full, frozen, lora"),
    (["--model", "tiny", "--step", "--tokens", "4096,3000"], "3000 is not a multiple of 2048"),
    (["--from", "no/such/report.json"], "--from no/such/report.json"),
    (["--from", "report.json", "--model", "tiny"], "--from formats saved reports: it takes no --model"),
], ids=["no-model", "unknown-model", "bad-tokens", "zero-tokens", "interpret-bf16", "bad-dtype", "missing-folder",
        "output-folder", "bad-step-mode", "step-tokens-not-whole-sequences", "from-missing-file", "from-with-model"])
def test_bad_input_exits_2_before_any_timing(cli, args, message):
    line = one_line_error(cli("bench", *args))
    assert message in line, line


def test_plot_without_matplotlib_exits_2(cli, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # find_spec → None: as if not installed
    line = one_line_error(cli("bench", "--model", "qwen3-30b-a3b", "--plot", tmp_path / "bench.png"))
    assert "--plot needs matplotlib" in line and "pip install 'moe-tune[plot]'" in line


def test_token_counts_accept_lists_commas_and_k():
    assert _token_counts(["4096", "16384"]) == (4096, 16384)
    assert _token_counts(["1k,4K", "16384 4096"]) == (1024, 4096, 16384)  # repeats dropped, order kept
    with pytest.raises(InvalidInputError):
        _token_counts(["-4"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter run")
def test_interpret_run_writes_json_markdown_and_plot(cli, tmp_path):
    # The default run: GEMMs, experts block and host overhead, each eager and under torch.compile.
    md, png, saved = tmp_path / "report.md", tmp_path / "bench.png", tmp_path / "report.json"
    args = ["bench", "--interpret", "--tokens", "16", "--seed", "7", "--json", "--markdown", md, "--output", saved]
    if HAS_MATPLOTLIB:
        args += ["--plot", png]
    result = cli(*args)
    assert result.code == 0, result.stderr
    report = BenchReport.from_dict(json.loads(result.stdout))
    assert report.model == "tiny" and report.dtype == "float32" and report.tokens == (16,)
    assert report.environment["card"] == "triton-interpreter (CPU)"
    assert report.settings["seed"] == 7 and report.settings["repeats"] == 1
    assert [(r.problem.gemm, r.problem.pass_) for r in report.gemms] == [
        (g, p) for g in ("up", "down") for p in ("forward", "dx", "dw")]
    assert not report.failed_checks
    labels = ["grouped_mm", "grouped_mm+compile", "moe_tune", "moe_tune+compile"]
    if HAS_TRANSFORMERS:
        assert [r.implementation for r in report.block.rows] == labels
        assert [r.implementation for r in report.host.rows] == labels
    else:
        assert report.block.skipped.startswith("transformers is not installed")
    assert report.settings["compile"]["backend"] == "aot_eager"
    assert fmt.from_json(saved.read_text()) == report
    text = md.read_text()
    assert text.startswith("## moe-tune bench: tiny (E=4, H=64, I=32, k=2), float32")
    assert "### Host overhead" in text and "### Training steps" in text
    assert f"torch {torch.__version__}" in text and "Triton " in text
    if HAS_MATPLOTLIB:
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert "moe-tune sweep --model tiny" in result.stderr  # the cache-miss note, once


@pytest.mark.skipif(torch.cuda.is_available() or not HAS_TRANSFORMERS, reason="interpreter run with transformers")
def test_interpret_step_section(cli, tmp_path):
    md, saved = tmp_path / "steps.md", tmp_path / "steps.json"
    result = cli("bench", "--interpret", "--step", "--step-modes", "frozen", "--step-layers", "1", "--no-gemms",
                 "--no-block", "--no-host", "--output", saved, "--markdown", md)
    assert result.code == 0, result.stderr
    report = fmt.from_json(saved.read_text())
    assert report.gemms == () and report.block.skipped == "not requested"
    assert [(r.mode, r.label) for r in report.step.rows] == [
        ("frozen", "grouped_mm"), ("frozen", "moe_tune"), ("frozen", "grouped_mm+compile"), ("frozen", "moe_tune+compile")]
    assert all(r.error is None and r.loss is not None for r in report.step.rows)
    assert report.step.model["layers"] == 1
    assert "| T | mode | implementation | step ms |" in md.read_text()
    assert "experts frozen" in result.stdout


def test_from_merges_saved_reports_without_a_gpu(cli, tmp_path):
    full = synthetic_report(random.Random(0), compiled=True, steps=True)
    first = dataclasses.replace(full, step=dataclasses.replace(full.step, rows=(), skipped="not requested"))
    second = dataclasses.replace(full, gemms=(), block=dataclasses.replace(full.block, rows=(), skipped="x"),
                                 host=dataclasses.replace(full.host, rows=(), skipped="x"))
    paths = []
    for i, part in enumerate((first, second)):
        paths += ["--from", tmp_path / f"part{i}.json"]
        (tmp_path / f"part{i}.json").write_text(fmt.to_json(part))
    md = tmp_path / "merged.md"
    result = cli("bench", *paths, "--markdown", md, "--json")
    assert result.code == 0, result.stderr
    assert fmt.from_json(result.stdout) == full
    assert md.read_text() == fmt.markdown(full)


def test_from_exits_1_when_a_saved_moe_tune_run_failed(cli, tmp_path):
    report = synthetic_report(random.Random(1), steps=True)
    rows = list(report.step.rows)
    rows[1] = dataclasses.replace(rows[1], loss=rows[1].loss * 2)  # moe_tune, disagreeing
    saved = tmp_path / "bad.json"
    saved.write_text(fmt.to_json(dataclasses.replace(report, step=dataclasses.replace(report.step, rows=tuple(rows)))))
    result = cli("bench", "--from", saved)
    assert result.code == 1
    assert "disagree with their baseline or failed" in result.stderr and "first-step loss" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter run")
def test_interpret_run_prints_tables(cli):
    result = cli("bench", "--interpret", "--tokens", "8", "--no-block", "--no-host", "--no-compile")
    assert result.code == 0, result.stderr
    out = result.stdout
    assert out.startswith("moe-tune bench: tiny (E=4, H=64, I=32, k=2), float32")
    assert f"triton-interpreter (CPU) | driver n/a | torch {torch.__version__} | Triton" in out
    for title in ("grouped GEMMs: throughput", "grouped GEMMs: times", "grouped GEMMs: configs"):
        assert title in out
    assert "experts block: skipped: not requested" in out and "host overhead: skipped: not requested" in out
    assert "training steps: skipped: not requested" in out
    assert out.count("no cache: heuristic default") == 6


def test_cli_import_loads_no_torch():
    probe = ("import sys; from moe_tune.cli.app import _register_commands; _register_commands(); "
             "print([m for m in ('torch', 'triton', 'transformers', 'matplotlib') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
