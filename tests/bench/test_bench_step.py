"""The training-step section in Triton's CPU interpreter (float32, tiny shapes): the causal LM of
each supported family builds from a config with the preset's expert shapes, the modes train what
they say (frozen experts get no gradient, LoRA trains only adapters), every implementation starts
from the same weights and data (first-step losses agree), every mode runs eager and under
torch.compile (``aot_eager``), and a failing implementation is a row error. Also the skip reasons
and the FLOP split of the report's caption."""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from moe_tune.bench import lm
from moe_tune.bench.results import GRAPHED, STEP_MODES
from moe_tune.bench.run import INTERPRETER_COMPILE_BACKEND, BenchOptions, run_bench
from moe_tune.bench import step as step_mod
from moe_tune.bench.step import LOSS_TOLERANCE, bench_steps, run_steps
from moe_tune.bench.testing import QWEN3_30B
from moe_tune.bench.timing import wall_timer
from moe_tune.errors import InvalidInputError
from moe_tune.models import find_preset
from moe_tune.ops import graphs
from moe_tune.problem import MoeShape

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
HAS_PEFT = importlib.util.find_spec("peft") is not None
TINY = find_preset("tiny").shape  # E=4, H=64, I=32, k=2

pytestmark = pytest.mark.filterwarnings("ignore::moe_tune.errors.CacheWarning")
interpreter_with_transformers = pytest.mark.skipif(torch.cuda.is_available() or not HAS_TRANSFORMERS,
                                                   reason="interpreter run with transformers")


def tiny_master(seed: int = 0, family: str = "test", shape: MoeShape = TINY, layers: int = 1):
    config = lm.lm_config(shape, family, layers=layers, vocab=256, seq_len=16)
    return config, lm.build_lm(config, "float32", "cpu", seed)


def test_skip_reasons(monkeypatch):
    assert "deepseek-v3 is a deepseek_v3 model" in lm.step_skip_reason("deepseek_v3", "deepseek-v3")
    if HAS_TRANSFORMERS:
        assert lm.step_skip_reason("qwen3_moe", "qwen3-30b-a3b") is None
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    assert lm.lora_skip_reason() == "peft is not installed (pip install 'moe-tune[peft]')"


def test_step_tokens_must_fill_whole_sequences():
    lm.check_step_tokens((16, 2048, 4096, 16384), 2048)  # one short sequence, or whole sequences
    with pytest.raises(InvalidInputError, match="3000 is not a multiple of 2048"):
        lm.check_step_tokens((4096, 3000), 2048)


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs transformers")
def test_caption_flop_split_and_moderate_vocabulary():
    config = lm.lm_config(QWEN3_30B, "qwen3_moe")
    assert config.vocab_size == lm.VOCAB < 151936  # the family default, capped
    assert (config.num_attention_heads, config.num_key_value_heads) == (32, 4)  # the family's defaults
    info = lm.describe(config, "qwen3_moe", QWEN3_30B, lm.SEQ_LEN)
    share = info["flop_share"]
    assert sum(share.values()) == pytest.approx(1.0)
    assert share["lm_head"] < share["experts"]  # the LM head does not dominate
    assert info["layers"] == 2 and info["lora_rank"] == 16 and info["vocab"] == lm.VOCAB


def test_expert_weight_names():
    assert lm.is_expert_weight("model.layers.1.mlp.experts.gate_up_proj")
    assert lm.is_expert_weight("model.layers.0.mlp.experts.down_proj")
    assert not lm.is_expert_weight("model.layers.0.mlp.gate.weight")
    assert not lm.is_expert_weight("model.layers.0.mlp.down_proj.weight")  # a dense MLP


@interpreter_with_transformers
def test_modes_train_what_they_say():
    config, master = tiny_master()
    frozen = lm.prepare_mode(copy.deepcopy(master), "moe_tune", "frozen")
    assert frozen.config._experts_implementation == "moe_tune"
    trainable = {n for n, p in frozen.named_parameters() if p.requires_grad}
    assert trainable and not any(lm.is_expert_weight(n) for n in trainable)
    assert "model.layers.0.mlp.gate.weight" in trainable  # the router still learns
    if HAS_PEFT:
        lora = lm.prepare_mode(copy.deepcopy(master), "grouped_mm", "lora")
        trainable = [n for n, p in lora.named_parameters() if p.requires_grad]
        # Per layer an A and a B for each of the two stacks (PEFT nests the second wrapper as base_layer).
        assert len(trainable) == 4 and all(".mlp.experts." in n and ".lora_" in n for n in trainable)


@interpreter_with_transformers
@pytest.mark.parametrize("family, shape", [
    ("olmoe", MoeShape(E=4, H=64, I=32, topk=2)),  # OLMoE's attention defaults: 16 heads
    ("mixtral", MoeShape(E=4, H=64, I=48, topk=2)),  # Mixtral's: 32 heads, 8 key/value; 2I = 96
    # gpt-oss: transposed weights, biases, interleaved clamped SwiGLU, attention sinks
    ("gpt_oss", MoeShape(E=4, H=64, I=48, topk=2, layout="gpt_oss")),
], ids=["olmoe", "mixtral", "gpt-oss"])
def test_other_families_build_and_agree(family, shape):
    config, master = tiny_master(family=family, shape=shape)
    assert type(config).__name__ == lm.LM_FAMILIES[family].config_class
    ids = lm.token_batch(config, 16, 16, "cpu")
    losses = [run_steps(master, ids, tokens=16, mode="full", implementation=impl, compiled=False, device="cpu",
                        steps=1, warmup=1).loss for impl in ("grouped_mm", "moe_tune")]
    assert losses[1] == pytest.approx(losses[0], rel=LOSS_TOLERANCE["float32"])


@interpreter_with_transformers
def test_every_mode_eager_and_compiled():
    preset = find_preset("tiny")
    options = BenchOptions(model="tiny", shape=preset.shape, family=preset.family, tokens=(16,), dtype="float32",
                           device="cpu", gemms=False, block=False, host=False, step=True, step_layers=1,
                           compile_backend=INTERPRETER_COMPILE_BACKEND, step_steps=1, step_warmup=1)
    saved = []
    report = run_bench(options, wall_timer(), checkpoint=saved.append)  # the step section times itself
    section = report.step
    # A checkpoint after every run: a time limit loses at most the run it interrupts.
    assert [len(s.step.rows) for s in saved] == list(range(1, len(section.rows) + 1)) + [len(section.rows)]
    assert section.skipped is None and section.model["layers"] == 1 and section.model["vocab"] == 256
    modes = STEP_MODES if HAS_PEFT else ("full", "frozen")
    assert [(r.mode, r.compiled, r.implementation) for r in section.rows] == [
        (m, c, i) for m in modes for c in (False, True) for i in ("grouped_mm", "moe_tune")]
    for row in section.rows:
        assert row.error is None, (row.mode, row.label, row.error)
        assert row.step.ms > 0 and row.host.ms > 0 and row.step.n == 1
        if row.compiled and row.mode != "lora":
            assert row.graphs == 1  # no graph break (PEFT's parametrized weights do break the graph)
        # Same weights and data: the first step's loss does not depend on the implementation.
        assert row.loss == pytest.approx(section.reference(16, row.mode).loss, rel=LOSS_TOLERANCE["float32"])
    assert not section.failed_losses
    assert section.mode_skipped == ({} if HAS_PEFT else {"lora": lm.lora_skip_reason()})
    assert not report.failed_checks and not report.row_errors


@interpreter_with_transformers
def test_a_failing_implementation_is_a_row_error():
    # The config is shared by every copy: a GELU MLP is what moe-tune refuses and transformers
    # (its act_fn built at construction) still runs.
    config, master = tiny_master()
    config.hidden_act = "gelu"
    rows = bench_steps(master, config, 16, modes=("full",), compile_steps=False, dtype="float32", device="cpu",
                       seq_len=16, steps=1, warmup=1)
    assert [r.implementation for r in rows] == ["grouped_mm", "moe_tune"]
    assert rows[0].error is None and rows[0].loss is not None
    assert rows[1].step is None and "activation 'gelu'" in rows[1].error


def test_timed_steps_alternate_and_a_failing_run_stops_alone():
    calls = []

    def stepper(name, fail_at=None):
        def step():
            calls.append(name)
            if fail_at is not None and calls.count(name) == fail_at:
                raise RuntimeError(f"{name} broke")
        return step

    first = step_mod._Run("first", stepper("first"), 1.0, None, None, False)
    second = step_mod._Run("second", stepper("second", fail_at=4), 1.0, None, None, False)
    step_mod._time([first, second], "cpu", 5)
    # (No peak step on the CPU.) The order reverses every round; "second" fails at its fourth step.
    assert calls == ["first", "second", "second", "first", "first", "second", "second", "first", "first"]
    assert len(first.host) == len(first.wall) == 5 and first.error is None
    assert len(second.host) == 3 and second.error == "RuntimeError: second broke" and not second.out_of_memory
    rows = [step_mod._row(run, 16, "full") for run in (first, second)]
    assert rows[0].step.n == 5 and rows[0].error is None
    assert rows[1].step is None and rows[1].error == "RuntimeError: second broke"


@interpreter_with_transformers
def test_copies_that_do_not_fit_together_are_timed_one_after_the_other(monkeypatch):
    config, master = tiny_master()
    real_start, starts = step_mod._start, []

    def start(*args, **kwargs):  # the second copy, beside the first, runs out of device memory
        starts.append(kwargs["implementation"])
        if len(starts) == 2:
            raise torch.OutOfMemoryError("CUDA out of memory (injected)")
        return real_start(*args, **kwargs)

    monkeypatch.setattr(step_mod, "_start", start)
    rows = bench_steps(master, config, 16, modes=("full",), compile_steps=False, dtype="float32", device="cpu",
                       seq_len=16, steps=2, warmup=1)
    assert starts == ["grouped_mm", "moe_tune", "grouped_mm", "moe_tune"]
    assert [r.implementation for r in rows] == ["grouped_mm", "moe_tune"]
    for row in rows:
        assert row.error is None and row.note == step_mod.ALONE_NOTE and row.step.n == 2
    assert rows[1].loss == pytest.approx(rows[0].loss, rel=LOSS_TOLERANCE["float32"])


def test_graphed_rows_are_eager_full_and_frozen_only():
    order = step_mod.run_order(STEP_MODES, compile_steps=True, graphed=True)
    graphed = [(mode, compiled) for mode, compiled, impl in order if impl == GRAPHED]
    assert graphed == [("full", False), ("frozen", False)]
    assert GRAPHED not in {impl for _, _, impl in step_mod.run_order(STEP_MODES, compile_steps=True)}
    assert lm.graphed_rows("qwen3_moe", "cuda") and not lm.graphed_rows("qwen3_moe", "cpu")
    assert not lm.graphed_rows("gpt_oss", "cuda")


@interpreter_with_transformers
def test_the_graphed_row_turns_graphs_on_for_its_own_steps_only(monkeypatch):
    config, master = tiny_master()
    seen = []
    real = graphs.experts_block

    def spy(*args):
        seen.append(graphs.enabled())
        return real(*args)  # None off CUDA: the block runs eagerly

    monkeypatch.setattr(graphs, "experts_block", spy)
    monkeypatch.setattr(graphs, "_enabled", True)  # as MOE_TUNE_CUDA_GRAPHS=1: the plain row still runs without
    rows = bench_steps(master, config, 16, modes=("full",), compile_steps=False, dtype="float32", device="cpu",
                       seq_len=16, steps=3, warmup=1, graphed=True)
    assert [r.implementation for r in rows] == ["grouped_mm", "moe_tune", GRAPHED]
    assert all(r.error is None and r.step.n == 3 for r in rows)
    assert rows[2].loss == rows[1].loss  # the same path off CUDA, from the same weights
    # One layer: one block call per step of each moe-tune row (its first step and three timed ones).
    assert seen.count(True) == seen.count(False) == 4
    assert graphs.enabled()  # as before the bench
