"""``moe-tune models``: the model presets, or one model's six problems.

Data flow: ``moe_tune.models`` (presets from ``configs/models/``, a Hugging Face ``config.json``
or a ``--shape`` string, split by ``--ep``/``--tp``) → a table on stdout, or JSON with ``--json``.
"""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from moe_tune.cli.options import JsonOption

EpOption = Annotated[int, typer.Option("--ep", help="Expert-parallel size: divides the expert count.", min=1)]
TpOption = Annotated[int, typer.Option("--tp", help="Tensor-parallel size: divides the intermediate size.", min=1)]
HfConfigOption = Annotated[
    Optional[str],
    typer.Option("--hf-config", help="A local Hugging Face config.json to read E, H, I and k from.", show_default=False),
]
ShapeOption = Annotated[
    Optional[str],
    typer.Option("--shape", help="An explicit shape: E=..,H=..,I=..,topk=..", show_default=False),
]


def models(
    name: Annotated[Optional[str], typer.Argument(help="A preset (name, alias or Hugging Face repo id).",
                                                  show_default=False)] = None,
    hf_config: HfConfigOption = None,
    shape: ShapeOption = None,
    ep: EpOption = 1,
    tp: TpOption = 1,
    dtype: Annotated[str, typer.Option("--dtype", help="dtype of the problems listed for one model.")] = "bfloat16",
    json_output: JsonOption = False,
) -> None:
    """List the model presets, or show one model's per-rank shape and six tuning problems."""
    from moe_tune.models import find_preset, list_presets, resolve_model

    if name is None and hf_config is None and shape is None:
        presets = list_presets()
        if json_output:
            typer.echo(json.dumps([p.to_dict() for p in presets], indent=2))
            return
        _print_presets(presets)
        return
    spec = resolve_model(model=name, hf_config=hf_config, shape=shape, ep=ep, tp=tp)
    problems = spec.shape.problems(dtype)
    preset = find_preset(name) if name else None
    data = {
        "name": spec.name,
        "source": spec.source,
        "preset": preset.to_dict() if preset else None,
        "ep": ep,
        "tp": tp,
        "shape": {"E": spec.shape.E, "H": spec.shape.H, "I": spec.shape.I, "topk": spec.shape.topk},
        "problems": [{"key": p.key, "gemm": p.gemm, **p.to_dict()} for p in problems],
    }
    if json_output:
        typer.echo(json.dumps(data, indent=2))
        return
    _print_model(data)


def _print_presets(presets) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="model presets (per-expert shapes)")
    for column in ("preset", "family", "H", "I", "E", "k", "also"):
        table.add_column(column, justify="right" if column in ("H", "I", "E", "k") else "left",
                         no_wrap=column != "also")
    for p in presets:
        also = "test preset (for --interpret)" if p.test else ", ".join(p.aliases)
        table.add_row(p.name, p.family, str(p.shape.H), str(p.shape.I), str(p.shape.E), str(p.shape.topk), also)
    Console().print(table)


def _print_model(data: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s = data["shape"]
    parallel = f", ep={data['ep']} tp={data['tp']}" if data["ep"] > 1 or data["tp"] > 1 else ""
    table = Table(title=f"{data['name']}: E={s['E']} H={s['H']} I={s['I']} topk={s['topk']}{parallel}")
    for column in ("gemm", "pass", "E", "N", "K", "cache key"):
        table.add_column(column, justify="right" if column in ("E", "N", "K") else "left", overflow="fold")
    for p in data["problems"]:
        table.add_row(p["gemm"], p["pass"], str(p["E"]), str(p["N"]), str(p["K"]), p["key"])
    Console().print(table)


def register(app: typer.Typer) -> None:
    app.command("models")(models)
