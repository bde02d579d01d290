"""``moe-tune bench`` through the real entry point: the no-GPU and bad-input paths (exit 2, one
line on stderr, nothing timed), ``--plot`` without matplotlib, a whole run under ``--interpret``
(JSON on stdout parsed back, Markdown and PNG files written) and the text tables; the CLI stays
importable without torch."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from moe_tune.bench.results import BenchReport
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
], ids=["no-model", "unknown-model", "bad-tokens", "zero-tokens", "interpret-bf16", "bad-dtype", "missing-folder"])
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
    md, png = tmp_path / "report.md", tmp_path / "bench.png"
    args = ["bench", "--interpret", "--tokens", "16", "--seed", "7", "--json", "--markdown", md]
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
    if HAS_TRANSFORMERS:
        assert [r.implementation for r in report.block.rows] == ["grouped_mm", "moe_tune"]
    else:
        assert report.block.skipped.startswith("transformers is not installed")
    text = md.read_text()
    assert text.startswith("## moe-tune bench: tiny (E=4, H=64, I=32, k=2), float32")
    assert f"torch {torch.__version__}" in text and "Triton " in text
    if HAS_MATPLOTLIB:
        assert png.read_bytes()[:4] == b"\x89PNG"
    assert "moe-tune sweep --model tiny" in result.stderr  # the cache-miss note, once


@pytest.mark.skipif(torch.cuda.is_available(), reason="interpreter run")
def test_interpret_run_prints_tables(cli):
    result = cli("bench", "--interpret", "--tokens", "8", "--no-block")
    assert result.code == 0, result.stderr
    out = result.stdout
    assert out.startswith("moe-tune bench: tiny (E=4, H=64, I=32, k=2), float32")
    assert f"triton-interpreter (CPU) | driver n/a | torch {torch.__version__} | Triton" in out
    for title in ("grouped GEMMs: throughput", "grouped GEMMs: times", "grouped GEMMs: configs"):
        assert title in out
    assert "experts block: skipped: not requested" in out
    assert out.count("no cache: heuristic default") == 6


def test_cli_import_loads_no_torch():
    probe = ("import sys; from moe_tune.cli.app import _register_commands; _register_commands(); "
             "print([m for m in ('torch', 'triton', 'transformers', 'matplotlib') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
