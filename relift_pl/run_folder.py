"""One run folder for every rank of a launch.

Sharded checkpoints are written by every rank (each its own shard) and read back by every rank,
so all ranks must write into one folder on a filesystem all nodes share.

Choosing it happens in Hydra's ``hydra.run.dir`` (conf/train.yaml), before any process group:
- given on the command line (``hydra.run.dir=...``, as the SLURM recipe does): every rank has it;
- under torchrun: rank 0 stamps it (``outputs/<date>/<time>``, made absolute) and publishes it in
  the store torchrun's agent hosts at MASTER_ADDR:MASTER_PORT before any worker starts; the
  other ranks read it there, whatever their start-up skew. A restarted worker group
  (``--max-restarts``) finds the same folder;
- otherwise Hydra's own stamp (one process; Lightning's own launcher passes its folder on).
Rank 0 writes ``.hydra/`` and ``train.log``; rank r > 0 writes its ``train_rank<r>.log`` beside.
"""

from __future__ import annotations

import os
from datetime import timedelta

from omegaconf import OmegaConf
from torch.distributed import TCPStore

STORE_KEY = "relift/run_dir"
STORE_TIMEOUT = timedelta(minutes=10)  # rank 0 publishes seconds after the others start
_agreed: str | None = None


def launch_rank() -> int:
    """This process's global rank as its launcher set it (torchrun: RANK; srun with several
    tasks: SLURM_PROCID); 0 otherwise. Known before any process group exists."""
    if "RANK" in os.environ:
        return int(os.environ["RANK"])
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in os.environ:
        return int(os.environ["SLURM_PROCID"])
    return 0


def agreed_run_dir(default: str) -> str:
    """``hydra.run.dir``: rank 0's ``default`` for every rank under torchrun, else ``default``."""
    global _agreed
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return default
    if _agreed is None:
        store = TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                         timeout=STORE_TIMEOUT)  # fmt: skip
        if launch_rank() == 0:  # the first stamp stays (Hydra may resolve the key again)
            _agreed = store.compare_set(STORE_KEY, "", os.path.abspath(default)).decode()
        else:
            _agreed = store.get(STORE_KEY).decode()
    return _agreed


def register_resolvers() -> None:
    """The resolvers conf/train.yaml's ``hydra:`` section uses."""
    resolvers = {
        "relift_run_dir": agreed_run_dir,
        "relift_rank_log_suffix": lambda: f"_rank{launch_rank()}" if launch_rank() else "",
        "relift_on_rank_zero": lambda value: value if launch_rank() == 0 else None,
    }
    for name, resolver in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, resolver)
