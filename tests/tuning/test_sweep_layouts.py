"""What the sweep tunes besides the Qwen layout's six. ``--lora-rank``: the LoRA block's GEMMs —
which problems a rank adds (and which it shares with the base block), the flag's validation, the
provenance command, the runtime's hint on a miss, and one interpreter sweep whose cache the LoRA
block's config resolution then reads (no miss warning, the swept configs). gpt-oss's layout: one
interpreter sweep of its six problems, read back by its block, and the hint on a miss."""

from __future__ import annotations

import random
import warnings

import pytest

from moe_tune import runtime
from moe_tune.cache import read_cache_file
from moe_tune.cli.options import model_filter
from moe_tune.device import INTERPRETER_DEVICE
from moe_tune.errors import InvalidInputError
from moe_tune.models import load_preset, resolve_model
from moe_tune.ops.lora_block import lora_configs
from moe_tune.runtime import CacheWarning
from moe_tune.tuning.options import SweepOptions, named_problems, problem_label, select_problems, sweep_command
from moe_tune.tuning.sweep import run_sweep

QWEN = resolve_model("qwen3-30b-a3b")
TINY = resolve_model("tiny")


def test_each_rank_adds_its_factor_gemms():
    ranks = tuple(sorted(random.sample(range(2, 200), 2)))
    named = named_problems(SweepOptions(model=QWEN, lora_ranks=ranks[::-1]).resolved())
    shape = QWEN.shape
    base = shape.problems("bfloat16")
    assert list(named.values())[:6] == base
    factors = {name for name in named if "[r" in name}
    assert factors == {f"{m}[r{r}].{p}" for r in ranks for m in ("up_a", "up_b", "down_a", "down_b")
                       for p in ("forward", "dx", "dw")}
    for r in ranks:
        lora = shape.lora_problems(r)
        for name, problem in lora.items():
            assert problem in named.values(), name  # every launch of the LoRA block is tuned
            if "_" in name.split(".")[0]:
                assert named[f"{name.split('.')[0]}[r{r}].{name.split('.')[1]}"] == problem
                assert shape.lora_rank_of(problem) == r
    # The base GEMMs the LoRA block launches are four of the six (its down dx too: both blocks run
    # it unweighted).
    assert len(named) == 6 + 12 * len(ranks) and len(set(named.values())) == len(named)


def test_gemms_and_passes_filter_the_lora_problems_too():
    options = SweepOptions(model=QWEN, lora_ranks=(16,), gemms=("down",), passes=("dw",)).resolved()
    assert list(named_problems(options)) == ["down.dw", "down_a[r16].dw", "down_b[r16].dw"]
    assert problem_label(options, select_problems(options)[1]) == "down_a[r16].dw"


@pytest.mark.parametrize("ranks", [(0,), (-4,), (4097,), (True,)])
def test_bad_ranks_are_refused(ranks):
    with pytest.raises(InvalidInputError, match="--lora-rank"):
        SweepOptions(model=QWEN, lora_ranks=ranks).resolved()


def test_lora_only_leaves_the_base_six_out():
    options = SweepOptions(model=QWEN, lora_ranks=(32,), lora_only=True).resolved()
    named = named_problems(options)
    assert len(named) == 12 and not set(named.values()) & set(QWEN.shape.problems())
    assert sweep_command(options).endswith("--lora-rank 32 --lora-only")
    with pytest.raises(InvalidInputError, match="--lora-only needs --lora-rank"):
        SweepOptions(model=QWEN, lora_only=True).resolved()


def test_gpt_oss_lora_problems_are_swept():
    """gpt-oss's LoRA block (``moe_tune.ops.gptoss_lora``): the twelve factor GEMMs join the six
    (its four base GEMMs on the [E, K, N] weights are the six's own, the unweighted down dx
    included); a cache miss on a factor names the gpt-oss LoRA sweep."""
    model = resolve_model("gpt-oss-20b")
    rank = random.choice((8, 16, 32))
    named = named_problems(SweepOptions(model=model, lora_ranks=(rank,)).resolved())
    shape = model.shape
    six = set(shape.problems())
    assert len(named) == 6 + 12 and six <= set(named.values())
    lora = shape.lora_problems(rank)
    assert {lora[n] for n in ("up.forward", "up.dx", "down.forward", "down.dx")} <= six
    down_dx = named["down.dx"]
    assert down_dx.weight_layout == "kn" and down_dx.fusion == "none" and not down_dx.weighted
    for name, problem in lora.items():
        if problem not in six:
            assert runtime.sweep_command(problem) == (f"moe-tune sweep --model gpt-oss-20b --lora-rank {rank} "
                                                      f"--dtype bfloat16"), name


def test_the_provenance_command_carries_the_ranks():
    command = sweep_command(SweepOptions(model=QWEN, lora_ranks=(64, 16, 64)).resolved())
    assert command.endswith("--seed 0 --lora-rank 16,64")
    assert "--lora-rank" not in sweep_command(SweepOptions(model=QWEN).resolved())


def test_a_miss_on_a_lora_gemm_names_the_lora_sweep():
    shape = load_preset("qwen3-30b-a3b")
    rank = random.choice((8, 16, 32, 64, 128))
    for name, problem in shape.lora_problems(rank).items():
        command = runtime.sweep_command(problem)
        if "_" in name.split(".")[0]:
            assert command == f"moe-tune sweep --model qwen3-30b-a3b --lora-rank {rank} --dtype bfloat16", name
        elif problem in shape.problems():
            assert command == "moe-tune sweep --shape E=128,H=2048,I=768,topk=8 --dtype bfloat16", name
        else:
            assert "--lora-rank" in command, name
    # `show --model` and friends keep a model's LoRA entries.
    keep = model_filter("qwen3-30b-a3b")
    assert all(keep(p) for p in shape.lora_problems(rank).values())
    assert not keep(load_preset("mixtral-8x7b").lora_problems(rank)["up_a.forward"])


def test_an_interpreter_lora_sweep_fills_what_the_lora_block_resolves(tmp_path, rng):
    rank = rng.choice((3, 8))
    options = SweepOptions(model=TINY, tokens=(32,), interpret=True, cache_dir=tmp_path, lora_ranks=(rank,),
                           passes=("forward", "dx", "dw"), seed=rng.getrandbits(31)).resolved()
    report = run_sweep(options)
    assert report.complete, report.stopped
    (path,) = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    cache = read_cache_file(path)
    assert sorted(p.key for p in cache.problems()) == sorted(p.key for p in select_problems(options))
    assert f"--lora-rank {rank}" in cache.provenance.writes[-1].command

    shape = TINY.shape
    runtime.set_cache_dir(tmp_path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", CacheWarning)
            import torch
            configs = lora_configs(shape.E, shape.H, shape.I, shape.topk, torch.float32, rank, rank, 40,
                                   INTERPRETER_DEVICE)
    finally:
        runtime.set_cache_dir(None)
    lora = shape.lora_problems(rank, "float32")
    assert {n for n in lora if "_" in n.split(".")[0]} <= set(configs)
    for name, config in configs.items():
        assert config == cache.get(lora[name], 32).config, name


# -- gpt-oss's layout: the same sweep, its own launches (moe_tune.ops.problems) ----------------------


def test_an_interpreter_sweep_tunes_the_gpt_oss_layout_and_the_block_reads_it(tmp_path, rng):
    from moe_tune.models import ModelSpec
    from moe_tune.ops.gptoss import block_configs
    from moe_tune.problem import MoeShape

    shape = MoeShape(E=4, H=64, I=32, topk=2, layout="gpt_oss")
    options = SweepOptions(model=ModelSpec("tiny-gpt-oss", shape, source="shape"), tokens=(32,), interpret=True,
                           cache_dir=tmp_path, seed=rng.getrandbits(31)).resolved()
    report = run_sweep(options)
    assert report.complete, report.stopped
    (path,) = [p for p in tmp_path.iterdir() if p.suffix == ".json"]
    cache = read_cache_file(path)
    assert sorted(p.key for p in cache.problems()) == sorted(p.key for p in shape.problems("float32"))
    for problem in shape.problems("float32"):
        assert cache.get(problem, 32).measurement.correct

    import torch
    runtime.set_cache_dir(tmp_path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", CacheWarning)
            configs = block_configs(shape.E, shape.H, shape.I, shape.topk, torch.float32, 40, INTERPRETER_DEVICE)
    finally:
        runtime.set_cache_dir(None)
    for (gemm, pass_), config in configs.items():
        problem = next(p for p in shape.problems("float32") if (p.gemm, p.pass_) == (gemm, pass_))
        assert config == cache.get(problem, 32).config


def test_a_miss_on_a_gpt_oss_problem_names_its_preset():
    for name in ("gpt-oss-20b", "gpt-oss-120b"):
        for problem in load_preset(name).problems():
            assert runtime.sweep_command(problem) == f"moe-tune sweep --model {name} --dtype bfloat16"
