"""A local parquet in the schema of the paper's training set, built from local worked solutions.

``Elliott/Openr1-Math-46k-8192`` lives on the hub. Machines without it (CI, the paper rehearsal)
still run the exact loading path the recipe uses (a parquet file through ``datasets``, the
OpenR1 column paths, the R1 response format) on rows of that schema made from MATH solutions:

    prompt       [{role: system, content: <system prompt>}, {role: user, content: <problem>}]
    target       [{role: assistant, content: "<think>\\n<solution>\\n</think>\\n\\n... \\boxed{a}"}]
    reward_model {ground_truth: <answer>, style: rule}
    data_source, extra_info {index}

Used from a config as ``path: ${openr1_sample:<source jsonl>,<cache dir>,<rows>}`` (the resolver
is registered by ``relift_pl.train``); the file is written once per (source, rows) and reused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from relift_pl.config import ConfigError

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."


def openr1_sample(source: str, cache_dir: str, rows: int | str) -> str:
    """Path of a parquet with the first ``rows`` rows of ``source`` (JSON Lines with ``problem``,
    ``solution``, ``answer``) in the OpenR1-Math schema; written atomically on first use."""
    rows = int(rows)
    source_path = Path(source)
    if not source_path.is_file():
        raise ConfigError(
            f"{source_path} does not exist: the OpenR1-schema sample is drawn from the math training "
            "set under paths.data_dir; set paths.data_dir=<a folder holding train/ and benchmarks/> "
            "(or RELIFT_DATA_DIR)"
        )
    stat = source_path.stat()
    target = Path(cache_dir) / f"openr1-{source_path.stem}-{rows}-{stat.st_size}.parquet"
    if target.exists():
        return str(target)
    records = []
    with open(source_path, encoding="utf-8") as handle:
        for index, line in enumerate(handle):
            if len(records) >= rows:
                break
            row = json.loads(line)
            trace = f"<think>\n{row['solution']}\n</think>\n\nThe final answer is $\\boxed{{{row['answer']}}}$."
            records.append({
                "data_source": "MATH (openr1 schema)",
                "prompt": [{"role": "system", "content": SYSTEM_PROMPT},
                           {"role": "user", "content": row["problem"]}],
                "target": [{"role": "assistant", "content": trace}],
                "reward_model": {"ground_truth": row["answer"], "style": "rule"},
                "extra_info": {"index": index},
            })
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    pq.write_table(pa.Table.from_pylist(records), tmp)
    os.replace(tmp, target)
    return str(target)
