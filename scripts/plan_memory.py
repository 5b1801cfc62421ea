"""Per-GPU memory of a relift-pl run, phase by phase, against the device's memory.

    python scripts/plan_memory.py experiment=relift_qwen_math_7b trainer=fsdp_8gpu
    python scripts/plan_memory.py experiment=relift_qwen_math_7b trainer=fsdp_8gpu --token-chunk 2048
    python scripts/plan_memory.py experiment=relift_qwen_math_7b trainer=multinode trainer.num_nodes=4

Hydra overrides compose the real config from conf/ (as train.py does); the model's shape comes
from model.name_or_path's config.json when it is a local directory, else from the table of known
hub ids in relift_pl/memory_plan.py. The arithmetic and what it counts: relift_pl/memory_plan.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from rich.console import Console
from rich.table import Table

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from relift_pl.memory_plan import (  # noqa: E402
    GiB,
    MemoryPlan,
    notes,
    plan_memory,
    run_shape_from_config,
    with_token_chunk,
)
from relift_pl.model_shape import load_model_shape  # noqa: E402


def compose_config(overrides: list[str]):
    if not OmegaConf.has_resolver("relift_root"):  # train.py's resolver, without importing it
        OmegaConf.register_new_resolver("relift_root", lambda: str(ROOT))
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=overrides)


def render(plan: MemoryPlan, console: Console) -> None:
    """One row per resident thing, one column per phase; totals and margins at the bottom."""
    names: list[str] = []
    formulas: dict[str, str] = {}
    for phase in plan.phases:
        for item in phase.items:
            if item.name not in names:
                names.append(item.name)
            formulas.setdefault(item.name, item.formula)
    model, run = plan.model, plan.run
    chunk = (
        "full logits" if run.token_chunk is None else f"fused head, token_chunk={run.token_chunk}"
    )
    table = Table(
        title=f"{model.name} ({model.params / 1e9:.2f}B params): GiB per GPU ({run.world_size} GPUs), {chunk}",
        caption="(in parentheses: not resident at the phase's peak)",
    )
    table.add_column("resident", style="bold")
    for phase in plan.phases:
        table.add_column(phase.name, justify="right")
    for name in names:
        cells = []
        for phase in plan.phases:
            item = next((i for i in phase.items if i.name == name), None)
            if item is None:
                cells.append("")
            else:
                text = f"{item.bytes / GiB:.2f}"
                cells.append(text if item.counted else f"[dim]({text})[/dim]")
        table.add_row(name, *cells)
    table.add_section()
    table.add_row("total", *(f"{p.total / GiB:.2f}" for p in plan.phases), style="bold")
    table.add_row("device", *(f"{run.device_bytes / GiB:.2f}" for _ in plan.phases))
    margins = []
    for phase in plan.phases:
        margin = plan.margin(phase) / GiB
        margins.append(f"[{'green' if margin >= 0 else 'red'}]{margin:+.2f}[/]")
    table.add_row("margin", *margins, style="bold")
    console.print(table)
    for name in names:
        console.print(f"  {name}: {formulas[name]}", highlight=False)
    for note in notes(plan):
        console.print(f"* {note}", highlight=False)


def main(argv: list[str] | None = None) -> MemoryPlan:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "overrides", nargs="*", help="Hydra overrides, e.g. experiment=relift_qwen_math_7b"
    )
    parser.add_argument(
        "--device-gb", type=float, default=80.0, help="GPU memory in GiB (A100-80GB: 80)"
    )
    parser.add_argument(
        "--overhead-gb",
        type=float,
        default=2.0,
        help="CUDA context, NCCL buffers, fragmentation (an estimate)",
    )
    parser.add_argument(
        "--token-chunk",
        default=None,
        help="fused log-prob head chunk (overrides algorithm.logprob_token_chunk); 'none': full logits",
    )
    args = parser.parse_args(argv)
    cfg = compose_config(args.overrides)
    run = run_shape_from_config(cfg, device_gb=args.device_gb, overhead_gb=args.overhead_gb)
    if args.token_chunk is not None:
        run = with_token_chunk(
            run, None if args.token_chunk.lower() == "none" else int(args.token_chunk)
        )
    if not cfg.model.name_or_path:
        parser.error(
            "model.name_or_path is null (the toy model is built at run time): pick a model="
        )
    try:
        model = load_model_shape(str(cfg.model.name_or_path))
    except KeyError as err:
        parser.error(str(err))
    plan = plan_memory(model, run)
    render(plan, Console(width=140))
    return plan


if __name__ == "__main__":
    main()
