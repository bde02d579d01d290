"""``moe-tune sweep --gpus / --shard`` through the real entry point: two timing lanes (real
worker processes, on the CPU under Triton's interpreter) and a shard, and the one-line exit-2
errors for a bad ``--gpus`` or ``--shard``, a GPU index that does not exist, and ``--shard`` or
``--gpus`` under torchrun."""

from __future__ import annotations

import json

import pytest
import torch


def test_two_lanes_and_a_shard_in_the_interpreter(cli, tmp_path):
    out = tmp_path / "cache"
    # Two problems (up and down forward), one bucket each, on two lanes in worker processes.
    result = cli("sweep", "--interpret", "--gpus", "0,1", "--passes", "forward", "--tokens", "32", "-o", out, "--json")
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["complete"] and report["lanes"] == ["cpu", "cpu"] and len(report["problems"]) == 2
    assert {lane for u in report["units"] for lane in [*u["screened_on"], u["settled_on"]]} == {"lane0:cpu", "lane1:cpu"}

    shard = cli("sweep", "--interpret", "--shard", "1/2", "--passes", "forward", "--tokens", "32",
                "-o", tmp_path / "shard1", "--json")
    assert shard.code == 0, shard.stderr
    data = json.loads(shard.stdout)
    assert data["split"] == {"kind": "shard", "index": 1, "count": 2} and len(data["problems"]) == 1
    assert data["journal_path"].endswith("-shard1of2.jsonl")


@pytest.mark.parametrize("args, env, message", [
    (["--gpus", "0,x"], None, "--gpus takes GPU indices like 0,2 (or all); cannot read 'x'"),
    (["--gpus", "99"], None, "--gpus 99: no such GPU ("),  # more than any host has
    (["--shard", "2/2"], None, "--shard takes i/n with 0 <= i < n"),
    (["--shard", "half"], None, "--shard takes i/n"),
    (["--interpret", "--shard", "0/2"], {"RANK": "0", "WORLD_SIZE": "2"}, "under torchrun the ranks split the work"),
    (["--interpret", "--gpus", "0"], {"RANK": "0", "WORLD_SIZE": "2"}, "drop --gpus"),
    (["--interpret", "--gather-timeout", "0"], None, "--gather-timeout must be a positive number of seconds"),
])
def test_bad_split_flags_exit_2_with_one_line(cli, args, env, message):
    model = [] if "--interpret" in args else ["--model", "qwen3-30b-a3b"]
    result = cli("sweep", *model, *args, env=env)
    assert result.code == 2 and result.stdout == ""
    assert result.stderr.startswith("moe-tune: error: ") and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_gpus_on_a_host_without_gpus(cli):
    result = cli("sweep", "--model", "qwen3-30b-a3b", "--gpus", "0")
    assert result.code == 2 and "--gpus 0: no such GPU (no GPU is visible)" in result.stderr
