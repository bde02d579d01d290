"""The config space and its pruning predicates (moe_tune/space.py), on every preset's problems:
what the sweep compiles is legal, and each named rule prunes what it claims to."""

from __future__ import annotations

import dataclasses

import pytest

from moe_tune.device import INTERPRETER_DEVICE, DeviceInfo
from moe_tune.errors import InvalidInputError
from moe_tune.models import list_presets, load_preset
from moe_tune.problem import DTYPE_BYTES, KernelConfig, MoeShape, Problem
from moe_tune.space import (
    HARD_PREDICATES,
    PREDICATES,
    SPACES,
    candidates,
    default_config,
    output_scattered,
    output_tile,
    rows_block_fits_tokens,
    shared_mem_bytes,
    why_illegal,
)

H100 = DeviceInfo("NVIDIA H100 80GB HBM3", (9, 0), sm_count=132, max_shared_mem=232448)
A100 = DeviceInfo("NVIDIA A100-SXM4-80GB", (8, 0), sm_count=108, max_shared_mem=166912)
SMALL = DeviceInfo("small-smem", (8, 6), sm_count=84, max_shared_mem=101376)  # sm_86: 99 KiB per block


def all_problems(dtype="bfloat16"):
    return [p for preset in list_presets(include_test=False) for p in preset.shape.problems(dtype)]


@pytest.mark.parametrize("space", ["quick", "default"])
@pytest.mark.parametrize("device", [H100, A100, SMALL], ids=["h100", "a100", "small-smem"])
def test_every_candidate_passes_every_predicate(space, device, rng):
    for problem in rng.sample(all_problems(rng.choice(["bfloat16", "float16", "float32"])), 12):
        for cfg in candidates(problem, device, space):
            assert why_illegal(problem, cfg, device, PREDICATES) is None


def test_shared_memory_rule_depends_on_the_device():
    problem = load_preset("qwen3-30b-a3b").problems()[0]
    big = KernelConfig(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, num_warps=8, num_stages=5)
    assert shared_mem_bytes(problem, big) > SMALL.max_shared_mem
    assert big not in candidates(problem, SMALL, "full")
    assert all(shared_mem_bytes(problem, c) <= SMALL.max_shared_mem for c in candidates(problem, SMALL, "default"))
    # fp32 doubles every operand buffer: fewer deep pipelines fit.
    fp32 = dataclasses.replace(problem, dtype="float32")
    assert len(candidates(fp32, H100, "default")) < len(candidates(problem, H100, "default"))


def test_tma_needs_sm90_and_aligned_rows():
    problem = load_preset("qwen3-30b-a3b").problems()[0]
    assert any(c.TMA_LOAD for c in candidates(problem, H100, "default"))
    assert not any(c.TMA_LOAD or c.TMA_STORE for c in candidates(problem, A100, "default"))
    # K = 1004 bf16 rows are 2008 bytes, not a multiple of 16: no tensor descriptor can read them.
    odd = Problem("forward", 8, 512, 1004, 2, "bfloat16", gather=True)
    assert not any(c.TMA_LOAD or c.TMA_STORE for c in candidates(odd, H100, "default"))


def test_scattered_outputs_never_store_through_tma():
    for problem in load_preset("qwen3-30b-a3b").problems():
        stores = {c.TMA_STORE for c in candidates(problem, H100, "default")}
        # the SwiGLU-backward epilogue (down dx) writes its three outputs by pointer
        pointer_only = output_scattered(problem) or (problem.fusion == "glu" and problem.pass_ == "dx")
        assert stores == ({False} if pointer_only else {False, True}), problem.key


def test_blocks_larger_than_the_problem_are_pruned():
    # tiny: N and K are 64 or 32; a 256-wide block would be three quarters masked.
    for problem in load_preset("tiny").problems("float32"):
        for cfg in candidates(problem, INTERPRETER_DEVICE, "full"):
            rows, cols = output_tile(problem, cfg)
            assert cols <= 64 and (problem.pass_ != "dw" or rows <= 64)


def test_token_rule_drops_row_blocks_far_above_the_rows_per_expert():
    problem = load_preset("qwen3-30b-a3b").problems()[0]  # E=128, k=8: T/16 rows per expert
    few = candidates(problem, H100, "full", num_tokens=64)  # 4 rows per expert
    many = candidates(problem, H100, "full", num_tokens=65536)
    assert max(c.BLOCK_M for c in few) == 64 and max(c.BLOCK_M for c in many) == 256
    assert all(rows_block_fits_tokens(problem, c, 64) for c in few)


def test_default_space_size_is_what_the_search_is_designed_for():
    # The search compiles ~56 of these per problem; the full space is the exhaustive reference.
    # A gathered operand doubles it with GATHER_COPY (copied to expert order first or not; a
    # forward's or dx's copied A also admits TMA loads of A and warp specialisation);
    # PROGRAMS_PER_SM adds the tilings small enough for two programs per SM (about half again),
    # and a 32-row step (for dW, where two programs fit with it) half again.
    for problem in load_preset("qwen3-30b-a3b").problems():
        assert 100 <= len(candidates(problem, H100, "default")) <= 1800
        assert len(candidates(problem, H100, "full")) > 1000


@pytest.mark.parametrize("device", [H100, A100, SMALL, INTERPRETER_DEVICE], ids=["h100", "a100", "small", "interp"])
def test_default_config_is_always_runnable(device):
    for problem in all_problems() + all_problems("float32"):
        assert why_illegal(problem, default_config(problem, device), device, HARD_PREDICATES) is None


def test_interpret_space_covers_the_tiny_preset():
    for dtype in ("float32", "float16"):
        for problem in load_preset("tiny").problems(dtype):
            found = candidates(problem, INTERPRETER_DEVICE, "interpret", num_tokens=32)
            assert 8 <= len(found) <= 16
            assert {c.TMA_LOAD for c in found} == {False, True}


def test_unknown_space_is_a_clear_error():
    from moe_tune.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown search space"):
        candidates(MoeShape(4, 64, 32, 2).problems()[0], H100, "huge")
    assert set(SPACES) >= {"quick", "default", "full", "interpret"}
    assert DTYPE_BYTES["float32"] == 4


B200 = DeviceInfo("NVIDIA B200", (10, 0), sm_count=148, max_shared_mem=232448)


def test_warp_spec_candidates_are_hopper_only_and_what_the_pass_compiles():
    # Triton 3.6's warp specialisation is the Hopper pass: four warps, TMA in and out, ≤ 4 stages,
    # 16-bit, A in expert order; the sweep's default space offers it only for such problems.
    for problem in all_problems() + all_problems("float16") + all_problems("float32"):
        for device in (H100, A100, B200):
            ws = [c for c in candidates(problem, device, "default") if c.WARP_SPEC]
            if device is not H100 or problem.dtype == "float32":
                assert not ws
                continue
            gathered_a = problem.gather if problem.pass_ == "forward" else problem.scatter
            if problem.pass_ != "dw" and (output_scattered(problem) or problem.fusion != "none"):
                assert not ws
            for c in ws:
                assert c.num_warps == 4 and c.TMA_LOAD and c.TMA_STORE and c.num_stages <= 4
                # gathered A rows only after GATHER_COPY has put them in expert order
                assert c.GATHER_COPY or problem.pass_ == "dw" or not gathered_a
        for qwen_dw in [p for p in load_preset("qwen3-30b-a3b").problems() if p.pass_ == "dw"]:
            assert any(c.WARP_SPEC for c in candidates(qwen_dw, H100, "default"))


@pytest.mark.parametrize("device, expected", [(H100, True), (A100, False), (B200, False)], ids=["h100", "a100", "b200"])
def test_sorted_dw_default_is_warp_specialised_on_hopper(device, expected):
    for problem in load_preset("qwen3-30b-a3b").problems():
        cfg = default_config(problem, device)
        assert cfg.WARP_SPEC == (expected and problem.pass_ == "dw")
    # gpt-oss's dW has 2880 rows per expert's gradient: a 128-row tile would straddle two experts.
    for problem in load_preset("gpt-oss-20b").problems():
        assert not default_config(problem, H100).WARP_SPEC


def test_several_programs_per_sm_only_where_they_can_share_one(rng):
    # Two programs share an SM only with room for both: shared memory, 16 warps of registers, and
    # no warp specialisation. Elsewhere the space holds one program per SM.
    seen_two = False
    for problem in rng.sample(all_problems(), 16):
        for device in (H100, A100, SMALL):
            for cfg in candidates(problem, device, "default"):
                if cfg.PROGRAMS_PER_SM == 1:
                    continue
                seen_two = True
                assert not cfg.WARP_SPEC and cfg.num_warps * cfg.PROGRAMS_PER_SM <= 16
                assert cfg.PROGRAMS_PER_SM * shared_mem_bytes(problem, cfg) <= device.max_shared_mem
                one = dataclasses.replace(cfg, PROGRAMS_PER_SM=1)
                assert why_illegal(problem, one, device) is None  # the knob adds configs, removes none
    assert seen_two
    dw = next(p for p in load_preset("gpt-oss-120b").problems() if p.pass_ == "dw")
    small = KernelConfig(BLOCK_M=32, BLOCK_N=128, BLOCK_K=128, num_warps=4, num_stages=4, TMA_STORE=True,
                         PROGRAMS_PER_SM=2)
    assert why_illegal(dw, small, H100) is None
    qwen_dw = next(p for p in load_preset("qwen3-30b-a3b").problems() if p.pass_ == "dw")
    ws = dataclasses.replace(small, TMA_LOAD=True, WARP_SPEC=True)
    assert why_illegal(qwen_dw, dataclasses.replace(ws, PROGRAMS_PER_SM=1), H100) is None
    for problem, cfg, reason in ((dw, dataclasses.replace(small, BLOCK_M=64, num_stages=3), "shared memory"),
                                 (dw, dataclasses.replace(small, num_warps=16), "registers"),
                                 (qwen_dw, ws, "does not combine with WARP_SPEC")):
        assert reason in why_illegal(problem, cfg, H100)
        assert why_illegal(problem, cfg, H100, HARD_PREDICATES) is None  # pruned from the search, still runs


def test_programs_per_sm_is_a_checked_config_field():
    cfg = KernelConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, PROGRAMS_PER_SM=2)
    assert KernelConfig.from_dict(cfg.to_dict()) == cfg and cfg.short().endswith(" p2")
    assert KernelConfig.from_dict({"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}).PROGRAMS_PER_SM == 1
    for bad in (0, 5, 1.5, True, "2"):
        with pytest.raises(InvalidInputError, match="PROGRAMS_PER_SM"):
            KernelConfig(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, PROGRAMS_PER_SM=bad)


def test_warp_specialised_forward_and_dx_need_128_rows_and_no_epilogue_weight():
    # On Hopper the two consumer warpgroups split BLOCK_M (64-row tiles failed to compile) and the
    # routing weight in a warp-specialised epilogue computes wrong values (Triton 3.6): neither is
    # a candidate, and the launcher refuses both; the interpreter runs any tile.
    ws = KernelConfig(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, num_warps=4, num_stages=3, TMA_LOAD=True, TMA_STORE=True,
                      GATHER_COPY=True, WARP_SPEC=True)
    for preset in ("qwen3-30b-a3b", "gpt-oss-20b"):
        for problem in load_preset(preset).problems():
            if problem.pass_ == "dw":
                continue
            for cfg in candidates(problem, H100, "default"):
                if cfg.WARP_SPEC:
                    assert cfg.BLOCK_M >= 128 and not problem.weighted
            gathered = problem.gather if problem.pass_ == "forward" else problem.scatter
            if gathered and not problem.weighted:
                assert why_illegal(problem, ws, H100) is None
                assert "BLOCK_M >= 128" in why_illegal(problem, dataclasses.replace(ws, BLOCK_M=64), H100)
                assert why_illegal(problem, dataclasses.replace(ws, BLOCK_M=64), INTERPRETER_DEVICE) is None
            if gathered and problem.weighted:
                assert "routing weight" in why_illegal(problem, ws, H100)
