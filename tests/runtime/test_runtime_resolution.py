"""The runtime loader: resolution order over every combination of layers, Triton and device
matching, strict mode, damaged files, warnings once, bucket choice at the boundaries, memo."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import pytest

from moe_tune import runtime
from moe_tune.cache import CacheFile, CacheStore
from moe_tune.cache.software import Software
from moe_tune.cache.software import kernel_source_hash, triton_version
from moe_tune.cache.testing import H100, random_measurement
from moe_tune.errors import CacheError, CacheMissError, CacheWarning
from moe_tune.problem import KernelConfig, MoeShape, Problem
from moe_tune.space import default_config

SHAPE = MoeShape(E=128, H=2048, I=768, topk=8)
UP_FWD, UP_DX, UP_DW, DOWN_FWD, DOWN_DX, DOWN_DW = SHAPE.problems()


def software(triton: str | None = None, kernel_hash: str | None = None) -> Software:
    return Software(triton=triton or triton_version(), torch="2.11.0", cuda="13.0", moe_tune="0.1.0",
                    kernel_hash=kernel_hash or kernel_source_hash())


def config(rng, **fixed) -> KernelConfig:
    # Legal on H100 for every problem here: small stages keep shared memory well under 227 KiB.
    values = dict(BLOCK_M=rng.choice([32, 64, 128]), BLOCK_N=rng.choice([64, 128]), BLOCK_K=rng.choice([32, 64]),
                  GROUP_M=rng.choice([1, 4, 8]), num_warps=rng.choice([4, 8]), num_stages=rng.randint(2, 3))
    values.update(fixed)
    return KernelConfig(**values)


def write(directory, entries, device=H100, sw=None, correct=True, rng=None):
    """entries: {problem: {tokens: config}} → a cache file in ``directory`` (via the real store)."""
    import random

    rng = rng or random.Random(0)
    cache = CacheFile.new(device, sw or software(), command="test")
    for problem, buckets in entries.items():
        for tokens, cfg in buckets.items():
            cache.add(problem, tokens, cfg, dataclasses.replace(random_measurement(rng), correct=correct))
    return CacheStore(directory).write(cache).path


def caught(fn):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        result = fn()
    return result, [w for w in seen if issubclass(w.category, CacheWarning)]


# -------------------------------------------------------------------------------------------------
# Resolution order
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("present", [
    (),  # nothing anywhere: heuristic default
    ("env",), ("user",), ("shipped",),  # one layer each
    ("env", "user"), ("env", "shipped"), ("user", "shipped"),  # the higher one wins
    ("env", "user", "shipped"),  # all three
])
def test_resolution_order(layers, rng, monkeypatch, present):
    monkeypatch.setenv("MOE_TUNE_CACHE_DIR", str(layers.env))
    configs = {}
    for name in ("env", "user", "shipped"):
        root = getattr(layers, name)
        if name in present:
            configs[name] = config(rng)
            write(root, {UP_FWD: {4096: configs[name]}}, rng=rng)
        elif rng.random() < 0.5:
            root.mkdir(parents=True)  # an empty layer and a missing one read the same
    resolution, seen = caught(lambda: runtime.explain(UP_FWD, 4096, H100))
    if present:
        assert resolution.source == present[0]
        assert resolution.config == configs[present[0]]
        assert seen == []
    else:
        assert resolution.source == "default" and resolution.config == default_config(UP_FWD, H100)
        assert len(seen) == 1
    assert runtime.get_config(UP_FWD, 4096, H100) == resolution.config


def test_explicit_path_replaces_the_env_layer(layers, rng, monkeypatch):
    monkeypatch.setenv("MOE_TUNE_CACHE_DIR", str(layers.env))
    env_cfg, explicit_cfg = config(rng, BLOCK_M=32), config(rng, BLOCK_M=64)
    write(layers.env, {UP_FWD: {4096: env_cfg}})
    path = write(layers.explicit, {UP_FWD: {4096: explicit_cfg}})
    runtime.set_cache_dir(layers.explicit)
    assert runtime.explain(UP_FWD, 4096, H100).source == "explicit"
    assert runtime.get_config(UP_FWD, 4096, H100) == explicit_cfg
    runtime.set_cache_dir(path)  # one file works too
    assert runtime.get_config(UP_FWD, 4096, H100) == explicit_cfg
    runtime.set_cache_dir(None)
    assert runtime.get_config(UP_FWD, 4096, H100) == env_cfg


def test_first_layer_holding_the_problem_answers_per_problem(layers, rng):
    user_cfg, shipped_cfg = config(rng), config(rng)
    write(layers.user, {UP_FWD: {128: user_cfg}})
    write(layers.shipped, {UP_FWD: {16384: shipped_cfg}, DOWN_FWD: {16384: shipped_cfg}})
    # The user layer has the problem (one bucket): it answers even far from that bucket.
    assert runtime.get_config(UP_FWD, 16384, H100) == user_cfg
    assert runtime.explain(DOWN_FWD, 16384, H100).source == "shipped"


# -------------------------------------------------------------------------------------------------
# Device and Triton matching, strict mode
# -------------------------------------------------------------------------------------------------


def test_running_triton_version_is_preferred_across_layers(layers, rng):
    old_cfg, current_cfg = config(rng, BLOCK_M=32), config(rng, BLOCK_M=128)
    write(layers.user, {UP_FWD: {4096: old_cfg}}, sw=software(triton="3.4.0"))
    write(layers.shipped, {UP_FWD: {4096: current_cfg}})
    assert runtime.explain(UP_FWD, 4096, H100).source == "shipped"


def test_other_triton_version_is_used_with_one_warning(layers, rng):
    cfg = config(rng)
    write(layers.user, {UP_FWD: {4096: cfg}, UP_DX: {4096: cfg}}, sw=software(triton="3.4.0"))
    resolution, seen = caught(lambda: runtime.explain(UP_FWD, 4096, H100))
    assert resolution.config == cfg and resolution.triton == "3.4.0"
    assert len(seen) == 1 and "Triton 3.4.0" in str(seen[0].message)
    _, again = caught(lambda: runtime.get_config(UP_DX, 4096, H100))
    assert again == []  # once per file


def test_strict_mode_refuses_other_triton_and_misses(layers, rng, monkeypatch):
    monkeypatch.setenv("MOE_TUNE_STRICT", "1")
    write(layers.user, {UP_FWD: {4096: config(rng)}}, sw=software(triton="3.4.0"))
    with pytest.raises(CacheMissError, match="strict mode refuses other Triton versions"):
        runtime.get_config(UP_FWD, 4096, H100)
    with pytest.raises(CacheMissError, match=r"moe-tune sweep --shape E=128,H=2048,I=768,topk=8 --dtype bfloat16"):
        runtime.get_config(DOWN_DW, 4096, H100)


def test_other_devices_are_ignored(layers, rng):
    h200 = dataclasses.replace(H100, name="NVIDIA H200", sm_count=132)
    same_name_other_cc = dataclasses.replace(H100, capability=(8, 0))
    write(layers.user, {UP_FWD: {4096: config(rng)}}, device=h200)
    write(layers.shipped, {UP_FWD: {4096: config(rng)}}, device=same_name_other_cc)
    resolution, seen = caught(lambda: runtime.explain(UP_FWD, 4096, H100))
    assert resolution.source == "default" and len(seen) == 1


def test_failed_gate_and_illegal_configs_are_never_used(layers, rng):
    write(layers.user, {UP_FWD: {4096: config(rng)}}, correct=False)
    huge = KernelConfig(BLOCK_M=256, BLOCK_N=256, BLOCK_K=256, num_stages=6)  # ~1.5 MiB of shared memory
    write(layers.shipped, {UP_FWD: {1024: huge}, UP_DX: {1024: huge}})
    resolution, seen = caught(lambda: runtime.explain(UP_FWD, 4096, H100))
    assert resolution.source == "default"
    assert any("shared memory" in str(w.message) for w in seen)


def test_kernel_source_mismatch_warns_once_but_is_used(layers, rng):
    cfg = config(rng)
    write(layers.user, {UP_FWD: {4096: cfg}, UP_DW: {4096: cfg}}, sw=software(kernel_hash="ffffffffffffffff"))
    resolution, seen = caught(lambda: runtime.explain(UP_FWD, 4096, H100))
    assert resolution.config == cfg and len(seen) == 1 and "kernel sources" in str(seen[0].message)
    assert caught(lambda: runtime.get_config(UP_DW, 4096, H100))[1] == []


# -------------------------------------------------------------------------------------------------
# Misses and damaged files
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("problem, command", [
    (UP_FWD, "moe-tune sweep --shape E=128,H=2048,I=768,topk=8 --dtype bfloat16"),  # up: N=2I, K=H
    (DOWN_DW, "moe-tune sweep --shape E=128,H=2048,I=768,topk=8 --dtype bfloat16"),  # down: N=H, K=I
    (dataclasses.replace(DOWN_FWD, weighted=False, dtype="float16"),  # unfused routing weight, fp16
     "moe-tune sweep --shape E=128,H=2048,I=768,topk=8 --dtype float16"),
    (Problem("forward", 8, 64, 64, 2), None),  # neither gathers nor scatters: no model shape
])
def test_miss_warns_once_per_problem_naming_the_sweep(problem, command):
    cfg, seen = caught(lambda: [runtime.get_config(problem, t, H100) for t in (1, 4096, 4097, 10**6)])
    assert cfg == [default_config(problem, H100)] * 4
    assert len(seen) == 1
    message = str(seen[0].message)
    assert problem.key in message and H100.name in message
    assert (command in message) if command else "pass configs= explicitly" in message
    assert runtime.sweep_command(problem) == command


def _future(doc):
    doc["schema_version"] = "4.1"
    return json.dumps(doc)


def _wrong_type(doc):
    doc["entries"][next(iter(doc["entries"]))]["buckets"][0]["config"]["num_warps"] = "eight"
    return json.dumps(doc)


DAMAGE = {
    "truncated": lambda doc: json.dumps(doc, indent=2)[: len(json.dumps(doc, indent=2)) // 2],
    "empty": lambda doc: "",
    "not-json": lambda doc: "this is not json\n",
    "wrong-typed": _wrong_type,
    "future-version": _future,
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_file_warns_once_and_falls_through(layers, rng, monkeypatch, damage):
    monkeypatch.setenv("MOE_TUNE_CACHE_DIR", str(layers.env))
    good = config(rng)
    write(layers.user, {UP_FWD: {4096: good}, UP_DX: {4096: good}})
    bad_path = write(layers.env, {UP_FWD: {4096: config(rng)}})
    bad_path.write_text(DAMAGE[damage](json.loads(bad_path.read_text())))
    resolution, seen = caught(lambda: runtime.explain(UP_FWD, 4096, H100))
    assert resolution.source == "user" and resolution.config == good
    assert len(seen) == 1 and bad_path.name in str(seen[0].message)
    assert "\n" not in str(seen[0].message)
    assert caught(lambda: runtime.get_config(UP_DX, 4096, H100))[1] == []  # once per file
    runtime.reset()
    monkeypatch.setenv("MOE_TUNE_STRICT", "1")
    with pytest.raises(CacheError, match=bad_path.name):
        runtime.get_config(UP_FWD, 4096, H100)


def test_unreadable_layer_does_not_crash(layers, rng, monkeypatch):
    monkeypatch.setenv("MOE_TUNE_CACHE_DIR", str(layers.env))
    write(layers.user, {UP_FWD: {4096: config(rng)}})
    layers.env.mkdir()
    (layers.env / "nvidia-h100-80gb-hbm3__triton-3.6.0.json").mkdir()  # a directory where a file belongs
    resolution, seen = caught(lambda: runtime.explain(UP_FWD, 4096, H100))
    assert resolution.source == "user"


# -------------------------------------------------------------------------------------------------
# Buckets and memo
# -------------------------------------------------------------------------------------------------

# buckets, token count, chosen bucket: the boundary each case pins
BUCKET_CASES = [
    ([16, 64], 32, 64),  # exactly the geometric mean: the tie goes to the larger bucket
    ([16, 64], 31, 16),  # just below it
    ([16, 64], 33, 64),  # just above it
    ([100, 1000], 316, 100),  # sqrt(1e5) = 316.2: 316 is nearer 100 in log space
    ([100, 1000], 317, 1000),
    ([128, 1024, 8192], 128, 128),  # exact bucket
    ([128, 1024, 8192], 1, 128),  # below the smallest
    ([128, 1024, 8192], 0, 128),  # an empty batch counts as one token
    ([128, 1024, 8192], 10**7, 8192),  # above the largest
    ([4096], 3, 4096),  # a single bucket takes everything
    ([1024, 4096], 2047, 1024),  # docs/cache.md's example: 2047² < 1024·4096
    ([1024, 4096], 2048, 4096),  # 2048² = 1024·4096, the tie goes up
]


@pytest.mark.parametrize("buckets, tokens, expected", BUCKET_CASES)
def test_choose_bucket_boundaries(buckets, tokens, expected):
    assert runtime.choose_bucket(buckets, tokens) == expected


def test_choose_bucket_matches_log_distance(rng):
    for _ in range(2000):
        buckets = sorted(rng.sample(range(1, 70000), rng.randint(1, 8)))
        tokens = rng.randint(0, 100000)
        got = runtime.choose_bucket(buckets, tokens)
        t = max(1, tokens)
        best = min(abs(math.log(t) - math.log(b)) for b in buckets)
        assert abs(math.log(t) - math.log(got)) <= best + 1e-12


def test_buckets_through_get_config(layers, rng):
    cfgs = {tokens: config(rng, BLOCK_M=bm) for tokens, bm in ((128, 32), (1024, 64), (8192, 128))}
    write(layers.user, {UP_FWD: cfgs})
    for tokens, bucket in ((1, 128), (362, 128), (363, 1024), (2896, 1024), (2897, 8192), (65536, 8192)):
        resolution = runtime.explain(UP_FWD, tokens, H100)
        assert (resolution.bucket, resolution.config) == (bucket, cfgs[bucket]), tokens


def test_lookups_are_memoised_until_reset(layers, rng):
    first, second = config(rng, BLOCK_M=32), config(rng, BLOCK_M=64)
    path = write(layers.user, {UP_FWD: {4096: first}})
    assert runtime.get_config(UP_FWD, 4096, H100) == first
    path.unlink()
    write(layers.user, {UP_FWD: {4096: second}})
    assert runtime.get_config(UP_FWD, 4096, H100) == first  # a running job keeps its configs
    runtime.reset()
    assert runtime.get_config(UP_FWD, 4096, H100) == second


def test_device_none_queries_the_current_device(layers):
    # Under TRITON_INTERPRET=1 (tests/conftest.py) the current device is the interpreter.
    from moe_tune.device import INTERPRETER_DEVICE, interpreting

    if not interpreting():
        pytest.skip("needs TRITON_INTERPRET=1")
    cfg, _ = caught(lambda: runtime.get_config(UP_FWD, 64))
    assert cfg == default_config(UP_FWD, INTERPRETER_DEVICE)


def test_bad_arguments_are_invalid_input():
    from moe_tune.errors import InvalidInputError

    with pytest.raises(InvalidInputError):
        runtime.get_config("forward", 4, H100)
    with pytest.raises(InvalidInputError):
        runtime.get_config(UP_FWD, -1, H100)
    with pytest.raises(InvalidInputError):
        runtime.get_config(UP_FWD, 4, {"name": "x"})


def two_cache_dirs(layers, rng, problem, first, second):
    """(tokens, [dir a, dir b]): two explicit cache directories, ``problem`` at a random bucket
    holding ``first`` in a and ``second`` in b."""
    tokens = rng.choice([1024, 4096, 16384])
    dirs = [layers.explicit / "a", layers.explicit / "b"]
    write(dirs[0], {problem: {tokens: first}}, rng=rng)
    write(dirs[1], {problem: {tokens: second}}, rng=rng)
    return tokens, dirs


def test_block_configs_follow_a_new_cache_dir(layers, rng):
    """The experts block keeps its six configs per (shape, tokens, device); a new cache directory
    (or a reset) must reach it at once, not after a restart."""
    import torch

    from moe_tune.ops.block import block_configs

    first, second = config(rng, BLOCK_N=64), config(rng, BLOCK_N=128)
    tokens, dirs = two_cache_dirs(layers, rng, UP_FWD, first, second)
    for directory, expected in zip(dirs, (first, second)):
        runtime.set_cache_dir(directory)
        for _ in range(2):  # the second call is the memo's hit
            got = block_configs(SHAPE.E, SHAPE.H, SHAPE.I, SHAPE.topk, torch.bfloat16, tokens, H100)
            assert got["up", "forward"] == expected
            assert got["down", "dx"] == default_config(DOWN_DX, H100)
    runtime.reset()
    runtime.set_cache_dir(layers.explicit / "missing")
    got = block_configs(SHAPE.E, SHAPE.H, SHAPE.I, SHAPE.topk, torch.bfloat16, tokens, H100)
    assert got["up", "forward"] == default_config(UP_FWD, H100)


@pytest.mark.parametrize("layout", ["concat", "gpt_oss"])
def test_lora_block_configs_follow_a_new_cache_dir(layers, rng, layout):
    """The LoRA blocks keep their configs per (shape, ranks, tokens, device) like the base block:
    a new cache directory reaches them at once."""
    import dataclasses

    import torch

    from moe_tune.ops import gptoss_lora, lora_block

    shape = dataclasses.replace(SHAPE, layout=layout)
    lora_configs = lora_block.lora_configs if layout == "concat" else gptoss_lora.lora_configs
    rank = rng.choice([8, 16, 64])
    factor = shape.lora_problems(rank)["up_a.forward"]
    first, second = config(rng, BLOCK_N=32), config(rng, BLOCK_N=64)
    tokens, dirs = two_cache_dirs(layers, rng, factor, first, second)
    for directory, expected in zip(dirs, (first, second)):
        runtime.set_cache_dir(directory)
        for _ in range(2):  # the second call is the memo's hit
            got = lora_configs(shape.E, shape.H, shape.I, shape.topk, torch.bfloat16, rank, rank, tokens, H100)
            assert got["up_a.forward"] == expected


# -------------------------------------------------------------------------------------------------
# A plain dx and its routing-weighted twin
# -------------------------------------------------------------------------------------------------

WEIGHTED_DOWN_DX = dataclasses.replace(DOWN_DX, weighted=True)  # how caches before 2026-11-28 keyed it


def test_the_blocks_down_dx_is_the_unweighted_problem_they_launch():
    assert not DOWN_DX.weighted and DOWN_DX.scatter and DOWN_DX.key == "dx/E128/N2048/K768/k8/bfloat16/scatter"
    assert runtime.interchangeable(DOWN_DX) == [DOWN_DX, WEIGHTED_DOWN_DX]
    assert runtime.interchangeable(DOWN_FWD) == [DOWN_FWD] and runtime.interchangeable(DOWN_DW) == [DOWN_DW]


@pytest.mark.parametrize("stored, asked", [(WEIGHTED_DOWN_DX, DOWN_DX), (DOWN_DX, WEIGHTED_DOWN_DX)],
                         ids=["older-cache-serves-the-block", "block-entry-serves-the-weighted-dx"])
def test_a_dx_without_an_entry_is_served_by_its_twin(layers, rng, stored, asked):
    cfg = config(rng)
    path = write(layers.shipped, {stored: {4096: cfg, 16384: config(rng)}})
    found, seen = caught(lambda: runtime.explain(asked, 5000, H100))
    assert (found.config, found.source, found.path, found.bucket) == (cfg, "shipped", str(path), 4096)
    assert seen == []


def test_the_exact_entry_wins_in_a_file_and_the_higher_layer_wins_across(layers, rng):
    own, twin, user_twin = config(rng, BLOCK_M=32), config(rng, BLOCK_M=64), config(rng, BLOCK_M=128)
    write(layers.shipped, {DOWN_DX: {4096: own}, WEIGHTED_DOWN_DX: {4096: twin}})
    assert runtime.get_config(DOWN_DX, 4096, H100) == own
    assert runtime.get_config(WEIGHTED_DOWN_DX, 4096, H100) == twin
    write(layers.user, {WEIGHTED_DOWN_DX: {4096: user_twin}})  # the user's own (older) sweep
    runtime.reset()
    assert runtime.get_config(DOWN_DX, 4096, H100) == user_twin


def test_a_twin_config_the_asked_problem_cannot_run_is_not_used(layers, rng):
    # Warp specialisation with the routing weight in the epilogue computes wrong values (Triton 3.6):
    # the unweighted dx may run this config, its weighted twin may not.
    ws = KernelConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3, TMA_LOAD=True,
                      TMA_STORE=True, GATHER_COPY=True, WARP_SPEC=True)
    write(layers.shipped, {DOWN_DX: {4096: ws}})
    assert runtime.get_config(DOWN_DX, 4096, H100) == ws
    found, seen = caught(lambda: runtime.explain(WEIGHTED_DOWN_DX, 4096, H100))
    assert found.source == "default" and found.config == default_config(WEIGHTED_DOWN_DX, H100)
    assert any("ignoring the config" in str(w.message) for w in seen)
