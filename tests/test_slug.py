"""One slug rule (moe_tune/slug.py) for every file name moe-tune builds: the cache files keep the
names they had before the rule moved (the shipped caches must still be found), and the sweep
journals' names use the same rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from moe_tune.cache import paths
from moe_tune.device import INTERPRETER_DEVICE
from moe_tune.models import resolve_model
from moe_tune.slug import MAX_LEN, slug

CACHES = Path(__file__).resolve().parent.parent / "caches"


@pytest.mark.parametrize("cache_file", sorted(p.name for p in CACHES.glob("*.json")))
def test_shipped_cache_names_are_unchanged(cache_file):
    # The file's own device and Triton version must still name it, byte for byte.
    data = json.loads((CACHES / cache_file).read_text())
    assert paths.file_name(data["device"]["name"], data["software"]["triton"]) == cache_file


# device name, Triton version, file name: names of cache files written before the rule moved
NAMES = [
    ("NVIDIA H200", "3.6.0", "nvidia-h200__triton-3.6.0.json"),
    ("NVIDIA H100 80GB HBM3", "3.6.0", "nvidia-h100-80gb-hbm3__triton-3.6.0.json"),
    ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", "3.6.0+git1a2b",
     "nvidia-h100-80gb-hbm3-mig-1g-10gb__triton-3.6.0-git1a2b.json"),
    ("triton-interpreter", "3.6.0", "triton-interpreter__triton-3.6.0.json"),
]


@pytest.mark.parametrize("device, version, name", NAMES)
def test_cache_file_names(device, version, name):
    assert paths.file_name(device, version) == name


def test_the_rule():
    assert slug("Qwen3-30B-A3B", dots=True, fallback="model") == "qwen3-30b-a3b"
    assert slug("deepseek-v2.5", dots=True, fallback="model") == "deepseek-v2.5"
    assert slug("deepseek-v2.5", fallback="model") == "deepseek-v2-5"
    assert slug("a..b", dots=True, fallback="x") == "a.b"  # never a parent-directory look-alike
    assert slug("  ..//  ", dots=True, fallback="x") == "x"
    assert slug("A  B", fallback="x") == "a-b"  # a run of separators is one dash
    assert len(slug("x" * 500, fallback="x")) == MAX_LEN


def test_journal_names_use_the_rule(tmp_path):
    from moe_tune.tuning.journal import journal_path

    path = journal_path(tmp_path, resolve_model("tiny"), INTERPRETER_DEVICE, "float32",
                        {"kind": "torchrun", "index": 1, "count": 4})
    assert path == tmp_path / "journals" / "sweep-tiny-float32-triton-interpreter-rank1of4.jsonl"
