"""``moe-tune models`` and the model inputs every tuning command shares (presets, Hugging Face
config.json files, --shape, --ep/--tp), through the real entry point; JSON parsed back."""

from __future__ import annotations

import json

import pytest

from moe_tune.errors import InvalidInputError
from moe_tune.models import find_preset, parse_shape, shape_from_hf_config, split_parallel
from moe_tune.problem import MoeShape

# DESIGN.md's preset table: name → (H, I, E, k).
DESIGN_PRESETS = {
    "qwen3-30b-a3b": (2048, 768, 128, 8),
    "qwen3-235b-a22b": (4096, 1536, 128, 8),
    "qwen3-next-80b-a3b": (2048, 512, 512, 10),
    "gpt-oss-20b": (2880, 2880, 32, 4),
    "gpt-oss-120b": (2880, 2880, 128, 4),
    "mixtral-8x7b": (4096, 14336, 8, 2),
    "deepseek-v3": (7168, 2048, 256, 8),
    "deepseek-v2-lite": (2048, 1408, 64, 6),
    "glm-4.5-air": (4096, 1408, 128, 8),
    "llama-4-scout": (5120, 8192, 16, 1),
    "olmoe-1b-7b": (2048, 1024, 64, 8),
    "granite-3-1b-a400m": (1024, 512, 32, 8),
}

# One config.json per family, with the field names its transformers config writes (values: the
# preset's), plus the distractor fields that a careless reader would pick up instead.
HF_CONFIGS = {
    "qwen3-30b-a3b": {"model_type": "qwen3_moe", "hidden_size": 2048, "intermediate_size": 6144,
                      "moe_intermediate_size": 768, "num_experts": 128, "num_experts_per_tok": 8},
    "qwen3-next-80b-a3b": {"model_type": "qwen3_next", "hidden_size": 2048, "intermediate_size": 5120,
                           "moe_intermediate_size": 512, "num_experts": 512, "num_experts_per_tok": 10},
    "gpt-oss-20b": {"model_type": "gpt_oss", "hidden_size": 2880, "intermediate_size": 2880,
                    "num_local_experts": 32, "num_experts_per_tok": 4, "experts_per_token": 4},
    "mixtral-8x7b": {"model_type": "mixtral", "hidden_size": 4096, "intermediate_size": 14336,
                     "num_local_experts": 8, "num_experts_per_tok": 2},
    "deepseek-v3": {"model_type": "deepseek_v3", "hidden_size": 7168, "intermediate_size": 18432,
                    "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1,
                    "num_experts_per_tok": 8},
    "deepseek-v2-lite": {"model_type": "deepseek_v2", "hidden_size": 2048, "intermediate_size": 10944,
                         "moe_intermediate_size": 1408, "n_routed_experts": 64, "n_shared_experts": 2,
                         "num_experts_per_tok": 6},
    "glm-4.5-air": {"model_type": "glm4_moe", "hidden_size": 4096, "intermediate_size": 10944,
                    "moe_intermediate_size": 1408, "n_routed_experts": 128, "num_experts_per_tok": 8},
    "llama-4-scout": {"model_type": "llama4", "text_config": {
        "model_type": "llama4_text", "hidden_size": 5120, "intermediate_size": 8192, "intermediate_size_mlp": 16384,
        "num_local_experts": 16, "num_experts_per_tok": 1}, "vision_config": {"hidden_size": 1408}},
    "olmoe-1b-7b": {"model_type": "olmoe", "hidden_size": 2048, "intermediate_size": 1024, "num_experts": 64,
                    "num_experts_per_tok": 8},
    "granite-3-1b-a400m": {"model_type": "granitemoe", "hidden_size": 1024, "intermediate_size": 512,
                           "num_local_experts": 32, "num_experts_per_tok": 8},
}


def one_line_error(result) -> str:
    assert result.code == 2, (result.code, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("moe-tune: error: "), result.stderr
    return lines[0]


def test_models_json_lists_every_design_preset(cli):
    result = cli("models", "--json")
    assert result.code == 0, result.stderr
    presets = {p["name"]: p for p in json.loads(result.stdout)}
    for name, (H, I, E, k) in DESIGN_PRESETS.items():
        assert (presets[name]["H"], presets[name]["I"], presets[name]["E"], presets[name]["topk"]) == (H, I, E, k)
        assert not presets[name]["test"]
    assert presets["tiny"]["test"] and (presets["tiny"]["E"], presets["tiny"]["H"], presets["tiny"]["I"],
                                        presets["tiny"]["topk"]) == (4, 64, 32, 2)
    assert set(presets) == set(DESIGN_PRESETS) | {"tiny"}


@pytest.mark.parametrize("name", ["qwen3-coder-30b-a3b", "Qwen3-VL-30B-A3B", "Qwen/Qwen3-30B-A3B", "QWEN3_30B_A3B"])
def test_aliases_and_repo_ids_name_the_same_preset(cli, name):
    result = cli("models", name, "--json")
    assert result.code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["preset"]["name"] == "qwen3-30b-a3b"
    assert [p["key"] for p in data["problems"]] == [p.key for p in MoeShape(128, 2048, 768, 8).problems()]


def test_unknown_model_exits_2_with_the_closest_names(cli):
    line = one_line_error(cli("models", "qwen3-30b"))
    assert "unknown model 'qwen3-30b'" in line and "did you mean qwen3-30b-a3b" in line
    line = one_line_error(cli("sweep", "--model", "mixtral-8x22b"))
    assert "mixtral-8x7b" in line
    assert "did you mean" not in one_line_error(cli("models", "zzzzzz"))


def test_ep_and_tp_split_the_shape(cli):
    data = json.loads(cli("models", "qwen3-235b-a22b", "--ep", "8", "--tp", "2", "--json").stdout)
    assert data["shape"] == {"E": 16, "H": 4096, "I": 768, "topk": 8}
    assert data["problems"][0]["N"] == 2 * 768 and data["problems"][0]["E"] == 16
    assert "--ep 3 does not divide the 128 experts" in one_line_error(cli("models", "qwen3-30b-a3b", "--ep", "3"))
    assert "--tp 5 does not divide" in one_line_error(cli("models", "qwen3-30b-a3b", "--tp", "5"))
    assert "fewer than topk=8" in one_line_error(cli("models", "granite-3-1b-a400m", "--ep", "8"))


@pytest.mark.parametrize("preset", sorted(HF_CONFIGS))
def test_hf_config_families(cli, tmp_path, preset):
    path = tmp_path / preset / "config.json"
    path.parent.mkdir()
    path.write_text(json.dumps(HF_CONFIGS[preset]))
    assert shape_from_hf_config(path) == find_preset(preset).shape
    data = json.loads(cli("models", "--hf-config", path, "--json").stdout)
    H, I, E, k = DESIGN_PRESETS[preset]
    assert data["shape"] == {"E": E, "H": H, "I": I, "topk": k} and data["source"] == "hf-config"


def test_hf_config_failures_are_clear(cli, tmp_path):
    unknown = tmp_path / "llama.json"
    unknown.write_text(json.dumps({"model_type": "llama", "hidden_size": 4096}))
    line = one_line_error(cli("models", "--hf-config", unknown))
    assert "model_type 'llama' is not a MoE family" in line and "--shape" in line
    missing = tmp_path / "qwen.json"
    missing.write_text(json.dumps({"model_type": "qwen3_moe", "hidden_size": 2048, "num_experts": 128,
                                   "num_experts_per_tok": 8}))
    assert "moe_intermediate_size" in one_line_error(cli("models", "--hf-config", missing))
    assert "cannot read" in one_line_error(cli("models", "--hf-config", tmp_path / "nope.json"))
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    assert "not valid JSON" in one_line_error(cli("models", "--hf-config", broken))


def test_shape_strings(cli, rng):
    E, H, I = rng.choice([4, 8, 64]), 64 * rng.randint(1, 64), 32 * rng.randint(1, 64)
    k = rng.randint(1, E)
    assert parse_shape(f"E={E}, H={H}, I={I}, topk={k}") == MoeShape(E, H, I, k)
    assert parse_shape(f"e={E},h={H},i={I},k={k}") == MoeShape(E, H, I, k)
    for bad, message in (("E=8,H=64,I=32", "lacks topk"), ("E=8,H=64,I=x,k=2", "must be an integer"),
                         ("E8,H=64", "cannot read"), ("E=2,H=64,I=32,k=4", "cannot exceed")):
        with pytest.raises(InvalidInputError, match=message):
            parse_shape(bad)
    assert "give exactly one of" in one_line_error(cli("models", "tiny", "--shape", "E=8,H=64,I=32,k=2"))
    with pytest.raises(InvalidInputError):
        split_parallel(MoeShape(8, 64, 32, 2), ep=0)
