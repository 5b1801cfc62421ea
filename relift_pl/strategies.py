"""FSDP2 through Lightning's ModelParallelStrategy, laid out over every rank of the launch, with
sharded checkpoints written atomically and checked complete, and saves that leave training
untouched.

Lightning writes a distributed checkpoint folder in place: a kill mid-save leaves a folder
that mixes two steps' shards under the real name. Here every rank writes into
``<name>.tmp``, all ranks wait, rank 0 checks that every rank's shard arrived (a node whose
checkpoint folder is on its own disk writes its shard where rank 0 cannot see it), and only then
swaps the finished folder into place (the old one is renamed aside, then removed), so ``<name>``
is always one complete save; an incomplete save's ``<name>.tmp`` is removed (also from the disks
of nodes that wrote where rank 0 cannot see).

torch's ``get_optimizer_state_dict`` (used to save, and to load) gives an optimizer that has
no state yet a placeholder one: it steps it at lr 0, so AdamW's moments exist with step 1, and
its first real step runs as its second (another bias correction). The SFT AdamW waits for the
buffer to fill, so a checkpoint before its first step changed training. Here such an
optimizer is saved with its placeholder, left stateless, and named in the checkpoint, so that
a resume drops the placeholder it loads.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy as _ModelParallelStrategy
from omegaconf import DictConfig
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from relift_pl.checkpoint import missing_shards, unreadable_checkpoint
from relift_pl.config import ConfigError
from relift_pl.export import replace_dir
from relift_pl.run_folder import RunFolderError


def fully_shard_models(models: list[torch.nn.Module | None], mesh, bf16: bool) -> None:
    """FSDP2: ``fully_shard`` each decoder layer of every model (None: skipped), then its root,
    over the data-parallel dimension of ``mesh``.

    With ``bf16`` (``trainer.precision=bf16-mixed``) parameters are all-gathered and computed in
    bf16, while the sharded parameters, their gradients and optimizer states stay in the dtype
    the model was loaded in (float32: the master weights an lr-1e-6 step needs) and gradients
    are reduced in float32 (FSDP2's MixedPrecisionPolicy).
    """
    names = mesh.mesh_dim_names or ()
    if "tensor_parallel" in names and mesh["tensor_parallel"].size() > 1:
        raise ValueError(
            "trainer.strategy.tensor_parallel_size must be 1: relift-pl shards with FSDP2 only"
        )
    kwargs = {"mesh": mesh["data_parallel"] if "data_parallel" in names else mesh}
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for model in models:
        if model is None:
            continue
        # The model's own list of blocks that must not be split (its decoder layers).
        layer_types = set(getattr(model, "_no_split_modules", None) or ())
        for block in model.modules():
            if type(block).__name__ in layer_types:
                fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)


def derived_data_parallel_size(num_nodes: int, devices_per_node: int, tensor_parallel: int | str) -> int:
    """Every rank that tensor parallelism leaves: nodes x devices / tensor-parallel size."""
    tp = devices_per_node if tensor_parallel == "auto" else int(tensor_parallel)
    return num_nodes * devices_per_node // tp


# The checkpoint key listing the optimizers (by index) that had no state when it was saved.
STATELESS_OPTIMIZERS = "relift_stateless_optimizers"


def shards_checkpoints(trainer: DictConfig) -> bool:
    """Whether the ``trainer`` config's strategy is FSDP2 (Lightning's ModelParallelStrategy),
    which writes and loads checkpoints as folders of shards."""
    from hydra.utils import get_class

    strategy = trainer.get("strategy")
    target = strategy.get("_target_") if isinstance(strategy, DictConfig) else None
    return bool(target) and issubclass(get_class(target), _ModelParallelStrategy)


class ModelParallelStrategy(_ModelParallelStrategy):
    """Lightning's ModelParallelStrategy whose data-parallel size follows the launch, whose
    sharded checkpoint saves are atomic and complete, and which leaves an optimizer without
    state as it was (see the module docstring).

    Args:
        data_parallel_size: ranks of one data-parallel group; None (the configs' setting):
            ``trainer.num_nodes x trainer.devices / tensor_parallel_size``, so any layout runs.
            (Lightning's own ``"auto"`` means ``num_nodes``.)
        tensor_parallel_size: 1 (relift-pl shards with FSDP2 only).
        **kwargs: Lightning's ModelParallelStrategy arguments.
    """

    def __init__(
        self, data_parallel_size: int | str | None = None, tensor_parallel_size: int | str = 1, **kwargs: Any
    ) -> None:
        super().__init__(
            data_parallel_size=data_parallel_size, tensor_parallel_size=tensor_parallel_size, **kwargs
        )
        self._stateless_at_save: set[int] = set()

    def setup_environment(self) -> None:
        if self._data_parallel_size is None:  # nodes and devices are known once the trainer is built
            self._data_parallel_size = derived_data_parallel_size(
                self.num_nodes, self.num_processes, self._tensor_parallel_size
            )
        super().setup_environment()

    def optimizer_state(self, optimizer) -> dict[str, Any]:
        inner = getattr(optimizer, "_optimizer", optimizer)  # Lightning's wrapper, if any
        stateless = not inner.state
        state = super().optimizer_state(optimizer)
        if stateless:
            inner.state.clear()  # the placeholder is in `state`, not in the optimizer
            self._stateless_at_save.add(self.optimizers.index(inner))
        return state

    def load_checkpoint(self, checkpoint_path, weights_only: bool | None = None) -> dict[str, Any]:
        try:
            metadata = super().load_checkpoint(checkpoint_path, weights_only)
        except (Exception, CheckpointException) as err:  # torch internals: one line naming the file
            raise unreadable_checkpoint(Path(checkpoint_path), err) from err
        for index in metadata.pop(STATELESS_OPTIMIZERS, ()):
            self.optimizers[index].state.clear()
        return metadata

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any = None) -> None:
        # Still stateless now (a state dict taken for anything but this save must not count).
        checkpoint[STATELESS_OPTIMIZERS] = sorted(i for i in self._stateless_at_save if not self.optimizers[i].state)
        self._stateless_at_save = set()
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(f"{path.name}.tmp")
        if self.global_rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        self.barrier("relift_checkpoint_tmp_clear")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("relift_checkpoint_written")  # every rank's shards and rank 0's metadata
        missing = self.broadcast(_missing_after_save(tmp) if self.global_rank == 0 else None)
        if missing:  # every rank stops here alike; the previous <name> stays as it was
            if self.global_rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            self.barrier("relift_checkpoint_incomplete")
            shutil.rmtree(tmp, ignore_errors=True)  # a node-local disk's copy (shared: gone already)
            raise RunFolderError(
                f"checkpoint {path} lacks {_shard_owners(missing)} ({', '.join(missing[:4])}), written "
                "where rank 0 cannot see it: every node must write checkpoints to one shared "
                "filesystem (callbacks.checkpoint.dirpath, hydra.run.dir); this save does not count"
            )
        if self.global_rank == 0:
            replace_dir(tmp, path)
        self.barrier("relift_checkpoint_in_place")


def _missing_after_save(folder: Path) -> list[str]:
    # Rank 0 alone looks: an error here must reach the other ranks (waiting in the broadcast).
    try:
        return missing_shards(folder)
    except Exception as err:
        return [f".metadata ({type(err).__name__}: {err})"]


def _shard_owners(files: list[str]) -> str:
    # torch.distributed.checkpoint names rank r's files __<r>_<i>.distcp.
    ranks = sorted({int(f[2:].split("_", 1)[0]) for f in files if f.startswith("__") and f[2:3].isdigit()})
    if not ranks:
        return "files"
    return f"rank {ranks[0]}'s shard" if len(ranks) == 1 else f"the shards of ranks {', '.join(map(str, ranks))}"


def check_parallel_layout(trainer: DictConfig) -> None:
    """An explicit ``trainer.strategy.data_parallel_size`` must cover the launch's ranks (checked
    before the model loads; Lightning only finds out after)."""
    strategy = trainer.get("strategy")
    if not isinstance(strategy, DictConfig) or strategy.get("data_parallel_size") is None:
        return
    devices, nodes = trainer.get("devices"), int(trainer.get("num_nodes", 1))
    dp, tp = strategy.data_parallel_size, strategy.get("tensor_parallel_size", 1)
    if not (isinstance(devices, int) and devices > 0 and isinstance(dp, int) and isinstance(tp, int)):
        return  # "auto", -1 or a device list: Lightning resolves them
    if dp * tp != nodes * devices:
        raise ConfigError(
            f"trainer.strategy.data_parallel_size={dp} x tensor_parallel_size={tp} must equal "
            f"trainer.num_nodes x trainer.devices = {nodes} x {devices} (every rank of the launch); "
            "set trainer.strategy.data_parallel_size=null to derive it"
        )
