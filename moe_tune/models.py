"""Model shapes: the presets in ``configs/models/``, Hugging Face ``config.json`` files, and
explicit ``E=..,H=..,I=..,topk=..`` strings, each turned into a ``MoeShape``.

Data flow: a preset name (or alias, or Hugging Face repo id) → ``find_preset`` → ``Preset`` (read
from the resource package ``moe_tune.presets`` with ``importlib.resources``, so it works from a
wheel) → ``.shape``; a ``config.json`` → ``shape_from_hf_config`` (field names per model family,
table ``HF_FAMILIES``); ``parse_shape`` for anything else. ``split_parallel`` then divides E by the
expert-parallel size and I by the tensor-parallel size. Pure Python: no torch.
"""

from __future__ import annotations

import difflib
import functools
import json
import os
from dataclasses import dataclass, field
from typing import Any, Mapping

from moe_tune.errors import InvalidInputError
from moe_tune.problem import MoeShape

PRESET_PACKAGE = "moe_tune.presets"


@dataclass(frozen=True)
class Preset:
    name: str
    family: str
    shape: MoeShape
    aliases: tuple[str, ...] = ()
    hf_ids: tuple[str, ...] = ()
    test: bool = False  # a test preset (tiny shapes for the interpreter), hidden from nobody
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "family": self.family,
            "E": self.shape.E,
            "H": self.shape.H,
            "I": self.shape.I,
            "topk": self.shape.topk,
            "layout": self.shape.layout,
            "aliases": list(self.aliases),
            "hf_ids": list(self.hf_ids),
            "test": self.test,
            "note": self.note,
        }


def _preset_from_json(data: Mapping[str, Any], origin: str) -> Preset:
    try:
        return Preset(
            name=str(data["name"]),
            family=str(data["family"]),
            shape=MoeShape(E=data["E"], H=data["H"], I=data["I"], topk=data["topk"],
                           layout=data.get("layout", "concat")),
            aliases=tuple(data.get("aliases", ())),
            hf_ids=tuple(data.get("hf_ids", ())),
            test=bool(data.get("test", False)),
            note=data.get("note"),
        )
    except KeyError as exc:
        raise InvalidInputError(f"model preset {origin} lacks {exc}") from None


def _presets_folder():
    import importlib.resources

    try:
        return importlib.resources.files(PRESET_PACKAGE) / "models"
    except ModuleNotFoundError:
        # A source checkout on PYTHONPATH, not installed (how GPU boxes often run it): the
        # resource package is the repository's configs/ folder.
        from pathlib import Path

        return Path(__file__).resolve().parent.parent / "configs" / "models"


@functools.lru_cache(maxsize=1)
def _load_all() -> tuple[Preset, ...]:
    folder = _presets_folder()
    presets = []
    for entry in sorted(folder.iterdir(), key=lambda f: f.name):
        if not entry.name.endswith(".json"):
            continue
        try:
            data = json.loads(entry.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise InvalidInputError(f"model preset {entry.name} is not valid JSON: {exc}") from None
        presets.append(_preset_from_json(data, entry.name))
    return tuple(presets)


def list_presets(include_test: bool = True) -> list[Preset]:
    """Every preset, by name; test presets (``tiny``) last."""
    presets = [p for p in _load_all() if include_test or not p.test]
    return sorted(presets, key=lambda p: (p.test, p.name))


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _names(preset: Preset) -> list[str]:
    repo_names = [hf.split("/")[-1] for hf in preset.hf_ids]
    return [_normalise(n) for n in (preset.name, *preset.aliases, *preset.hf_ids, *repo_names)]


def find_preset(name: str) -> Preset:
    """The preset called ``name``: its name, an alias or a Hugging Face repo id, case-insensitive.
    An unknown name raises ``InvalidInputError`` naming the closest presets."""
    wanted = _normalise(name)
    for preset in _load_all():
        if wanted in _names(preset):
            return preset
    choices = {n: p.name for p in _load_all() for n in (_normalise(p.name), *map(_normalise, p.aliases))}
    close = difflib.get_close_matches(wanted, list(choices), n=3, cutoff=0.5)
    suggestion = sorted({choices[c] for c in close}, key=[choices[c] for c in close].index)
    hint = f"; did you mean {', '.join(suggestion)}?" if suggestion else ""
    raise InvalidInputError(f"unknown model {name!r}{hint} (`moe-tune models` lists the presets)")


def load_preset(name: str) -> MoeShape:
    return find_preset(name).shape


# ---------------------------------------------------------------------------------------------
# Hugging Face config.json
# ---------------------------------------------------------------------------------------------

# Per family (config.json's model_type): the keys holding H, the expert's I, E and k, first match
# wins. Families differ: Qwen3/DeepSeek/GLM keep a separate `moe_intermediate_size` (their dense
# MLPs use `intermediate_size`), Mixtral-style configs count `num_local_experts`, DeepSeek and GLM
# count `n_routed_experts` (the shared experts are a dense MLP, not part of the grouped GEMM).
_QWEN = ("hidden_size", ("moe_intermediate_size",), ("num_experts",), ("num_experts_per_tok",))
_DEEPSEEK = ("hidden_size", ("moe_intermediate_size",), ("n_routed_experts",), ("num_experts_per_tok",))
_MIXTRAL = ("hidden_size", ("intermediate_size",), ("num_local_experts",), ("num_experts_per_tok",))
HF_FAMILIES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...], tuple[str, ...]]] = {
    "qwen3_moe": _QWEN,
    "qwen3_vl_moe": _QWEN,
    "qwen3_next": _QWEN,
    "qwen2_moe": _QWEN,
    "deepseek_v3": _DEEPSEEK,
    "deepseek_v2": _DEEPSEEK,
    "glm4_moe": _DEEPSEEK,
    "mixtral": _MIXTRAL,
    "granitemoe": _MIXTRAL,
    "llama4": _MIXTRAL,
    "llama4_text": _MIXTRAL,
    # gpt-oss: transformers writes num_local_experts/num_experts_per_tok; OpenAI's own files
    # also carry num_experts/experts_per_token.
    "gpt_oss": ("hidden_size", ("intermediate_size",), ("num_local_experts", "num_experts"),
                ("num_experts_per_tok", "experts_per_token", "num_experts_per_token")),
    "olmoe": ("hidden_size", ("intermediate_size",), ("num_experts",), ("num_experts_per_tok",)),
}
# Families whose experts are not the Qwen3-MoE "concat" layout (``moe_tune.problem.EXPERT_LAYOUTS``).
HF_LAYOUTS = {"gpt_oss": "gpt_oss"}


def _pick(config: Mapping[str, Any], keys: tuple[str, ...], what: str, family: str, path: str) -> int:
    for key in keys:
        value = config.get(key)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise InvalidInputError(f"{path}: {key} must be a positive integer, got {value!r}")
            return value
    raise InvalidInputError(f"{path}: a {family} config needs {what} ({' or '.join(keys)}); none is set")


def shape_from_hf_config(path: str | os.PathLike) -> MoeShape:
    """Read E, H, I and k from a local Hugging Face ``config.json``."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except OSError as exc:
        raise InvalidInputError(f"cannot read {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise InvalidInputError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise InvalidInputError(f"{path} must hold a JSON object")
    family = config.get("model_type")
    # Multimodal wrappers (Llama 4, Qwen3-VL) keep the language model's fields in text_config.
    text = config.get("text_config")
    if isinstance(text, dict) and (family not in HF_FAMILIES or "hidden_size" not in config):
        config, family = text, text.get("model_type", family)
    if family not in HF_FAMILIES:
        known = ", ".join(sorted(HF_FAMILIES))
        raise InvalidInputError(
            f"{path}: model_type {family!r} is not a MoE family moe-tune knows ({known}); "
            "pass --shape E=..,H=..,I=..,topk=.. instead"
        )
    h_key, i_keys, e_keys, k_keys = HF_FAMILIES[family]
    return MoeShape(
        layout=HF_LAYOUTS.get(family, "concat"),
        E=_pick(config, e_keys, "the expert count", family, path),
        H=_pick(config, (h_key,), "the hidden size", family, path),
        I=_pick(config, i_keys, "the expert intermediate size", family, path),
        topk=_pick(config, k_keys, "the experts per token", family, path),
    )


# ---------------------------------------------------------------------------------------------
# Explicit shapes and parallel splits
# ---------------------------------------------------------------------------------------------

_SHAPE_KEYS = {"e": "E", "h": "H", "i": "I", "topk": "topk", "k": "topk"}


def parse_shape(text: str) -> MoeShape:
    """``E=128,H=2048,I=768,topk=8`` (``k`` for topk; keys case-insensitive) → ``MoeShape``."""
    values: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        name = _SHAPE_KEYS.get(key.strip().lower())
        if not sep or name is None:
            raise InvalidInputError(f"--shape takes E=..,H=..,I=..,topk=..; cannot read {part!r}")
        try:
            values[name] = int(value)
        except ValueError:
            raise InvalidInputError(f"--shape: {key.strip()} must be an integer, got {value.strip()!r}") from None
    missing = [n for n in ("E", "H", "I", "topk") if n not in values]
    if missing:
        raise InvalidInputError(f"--shape lacks {', '.join(missing)} (E=..,H=..,I=..,topk=..)")
    return MoeShape(**values)


def split_parallel(shape: MoeShape, ep: int = 1, tp: int = 1) -> MoeShape:
    """Per-rank shape: expert parallelism divides E, tensor parallelism divides I."""
    for flag, value in (("--ep", ep), ("--tp", tp)):
        if not isinstance(value, int) or value < 1:
            raise InvalidInputError(f"{flag} must be a positive integer, got {value!r}")
    if shape.E % ep:
        raise InvalidInputError(f"--ep {ep} does not divide the {shape.E} experts")
    if shape.I % tp:
        raise InvalidInputError(f"--tp {tp} does not divide the intermediate size {shape.I}")
    if shape.topk > shape.E // ep:
        raise InvalidInputError(f"--ep {ep} leaves {shape.E // ep} experts per rank, fewer than topk={shape.topk}")
    return MoeShape(E=shape.E // ep, H=shape.H, I=shape.I // tp, topk=shape.topk, layout=shape.layout)


@dataclass(frozen=True)
class ModelSpec:
    """What a command was asked to tune: a display name and the per-rank shape."""

    name: str
    shape: MoeShape
    source: str = "preset"  # preset | hf-config | shape
    details: dict[str, Any] = field(default_factory=dict)


def resolve_model(model: str | None = None, hf_config: str | None = None, shape: str | None = None,
                  ep: int = 1, tp: int = 1) -> ModelSpec:
    """Exactly one of a preset name, a config.json path or a shape string → the per-rank shape."""
    given = [n for n, v in (("--model", model), ("--hf-config", hf_config), ("--shape", shape)) if v]
    if len(given) != 1:
        raise InvalidInputError("give exactly one of --model, --hf-config, --shape"
                                + (f" (got {', '.join(given)})" if given else ""))
    details: dict[str, Any] = {"ep": ep, "tp": tp}
    if model:
        preset = find_preset(model)
        name, base, source = preset.name, preset.shape, "preset"
        details["preset"] = preset.name
    elif hf_config:
        base, source = shape_from_hf_config(hf_config), "hf-config"
        name = os.path.basename(os.path.dirname(os.path.abspath(hf_config))) or "hf-config"
    else:
        base, source = parse_shape(shape), "shape"
        name = f"E{base.E}-H{base.H}-I{base.I}-k{base.topk}"
    per_rank = split_parallel(base, ep, tp)
    if ep > 1 or tp > 1:
        name = f"{name}-ep{ep}-tp{tp}"
    return ModelSpec(name, per_rank, source, details)
