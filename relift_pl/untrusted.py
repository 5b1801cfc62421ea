"""Reading files that may come from someone else: checkpoint folders and a run folder's config.

Unpickling can run any code, and so can building a config's ``_target_``. So:

- a checkpoint's own metadata (Lightning's ``meta.pt``) is read weights-only: tensors and plain
  Python types (torch's allow-list);
- torch's distributed-checkpoint metadata (``.metadata``, a plain pickle that torch itself
  unpickles) is first read through an allow-list of torch's checkpoint record classes, and every
  non-tensor entry of its shards (torch pickles those and unpickles them with anything allowed)
  is first read weights-only too; the project's own sharded loads read them weights-only;
- a saved config builds only classes of relift-pl, torch (``torch.optim``, ``torch.nn``) and
  Lightning, and the functions the project's own configs name (row and model builders).

Each refusal is a one-line :class:`UnsafeFileError` naming the file (or the config key); names
taken from a file are shown escaped when they hold control characters (:func:`shown`).
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import io
import pickle
import re
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf

from relift_pl.config import ConfigError

CONF = Path(__file__).resolve().parents[1] / "conf"
TRUST_NOTE = "relift-pl loads only what cannot run code; see README, Untrusted files"


class UnsafeFileError(ConfigError):
    """A file (or a saved config's key) that loading could turn into running code."""


def shown(text: Any) -> str:
    """``text`` as it may appear in a one-line message: as is when printable, else escaped
    (``ascii()``), so a name taken from a file cannot add lines or terminal escapes."""
    text = str(text)
    return text if text.isprintable() else ascii(text)


def _refused(path: str | Path, what: str) -> UnsafeFileError:
    return UnsafeFileError(
        f"{path} pickles {what}, which could run code when loaded: refused. Use a checkpoint this "
        f"project wrote ({TRUST_NOTE})"
    )


def load_weights_only(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)``, refusing anything else in one line.

    Raises:
        UnsafeFileError: the file pickles an object other than tensors and plain types.
    """
    return _load_weights_only(path, path)


def _load_weights_only(file: str | Path | io.BytesIO, named: str | Path) -> Any:
    """:func:`load_weights_only` of a file or buffer; ``named``: what a refusal calls it."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "Weights only load failed" not in str(err):
            raise  # a truncated or corrupted file: the caller says so
        found = re.search(r"GLOBAL (.*?) (?:was not an allowed global|whose module)", str(err), re.S)
        what = f"the global {shown(found.group(1))}" if found else "objects other than tensors and plain types"
        raise _refused(named, what) from None


def intact_archive(blob: bytes) -> bool:
    """Whether ``blob`` is an intact zip archive, as ``torch.save`` writes (a CRC per member)."""
    try:
        with zipfile.ZipFile(io.BytesIO(blob)) as archive:
            return archive.testzip() is None
    except (zipfile.BadZipFile, EOFError, ValueError, UnicodeDecodeError):
        return False


# torch's distributed-checkpoint metadata pickles these besides its own record classes.
_TORCH_VALUES = (torch.dtype, torch.layout, torch.memory_format)
_ALLOWED_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout by name, as torch's weights-only loader allows
    ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
}


class _RefusedGlobal(pickle.UnpicklingError):
    """A global outside the allow-list (a truncated file raises the plain UnpicklingError)."""


class _CheckpointMetadataUnpickler(pickle.Unpickler):
    """Resolves only torch's checkpoint records (dataclasses and enums of
    ``torch.distributed.checkpoint``), torch dtypes / layouts / memory formats and the globals
    in :data:`_ALLOWED_GLOBALS` (the "Restricting Globals" recipe of the pickle docs)."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith("torch.distributed.checkpoint."):
            found = super().find_class(module, name)
            record = isinstance(found, type) and (dataclasses.is_dataclass(found) or issubclass(found, enum.Enum))
            if record and found.__module__.startswith("torch.distributed.checkpoint."):
                return found
        elif module == "torch" and isinstance(getattr(torch, name, None), _TORCH_VALUES):
            return getattr(torch, name)
        elif (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise _RefusedGlobal(f"the global {shown(f'{module}.{name}')}")


def check_distributed_checkpoint_metadata(folder: str | Path) -> None:
    """Reads ``<folder>/.metadata`` through the allow-list before torch unpickles it.

    Raises:
        UnsafeFileError: it names a global outside the allow-list.
    """
    path = Path(folder) / ".metadata"
    try:
        with open(path, "rb") as handle:
            _CheckpointMetadataUnpickler(handle).load()
    except _RefusedGlobal as err:
        raise _refused(path, str(err)) from None


def check_distributed_checkpoint_values(folder: str | Path) -> None:
    """Reads every non-tensor entry of a distributed checkpoint's shards weights-only.

    torch stores a state dict's non-tensor values (optimizer and loop state) as ``torch.save``
    bytes and unpickles them with ``weights_only=False`` when it loads the folder (Lightning's
    resume does); each is read here first, from the place the metadata gives it. Run it after
    :func:`check_distributed_checkpoint_metadata` and once the shards are known complete.

    Raises:
        UnsafeFileError: an entry pickles an object other than tensors and plain types.
        ValueError: an entry is not an intact ``torch.save`` archive (a corrupted shard; torch
            would read anything else as a plain pickle).
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex

    metadata = FileSystemReader(str(folder)).read_metadata()
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, BytesStorageMetadata):
            continue  # tensors: torch reads them weights-only
        named = f"{folder}: the entry {shown(repr(key))}"
        stored = metadata.storage_data[MetadataIndex(key)]  # the lookup torch's reader makes
        if getattr(stored, "transform_descriptors", None):
            raise UnsafeFileError(
                f"{named} is stored through transforms "
                f"({shown(', '.join(map(str, stored.transform_descriptors)))}), which this project "
                f"never writes and cannot check: refused ({TRUST_NOTE})"
            )
        with open(Path(folder) / stored.relative_path, "rb") as handle:
            handle.seek(stored.offset)
            value = handle.read(stored.length)
        if not intact_archive(value):
            raise ValueError(f"its shard {stored.relative_path} is corrupted ({named} fails its CRC check)")
        _load_weights_only(io.BytesIO(value), named)


def load_distributed_checkpoint(state: dict[str, Any], folder: str | Path) -> None:
    """``torch.distributed.checkpoint.load(state, folder)`` in this one process, reading the
    keys of ``state`` in place, non-tensor entries weights-only (torch's own planner unpickles
    them with anything allowed).

    Raises:
        UnsafeFileError: an entry pickles an object other than tensors and plain types.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._traverse import set_element

    class WeightsOnlyLoadPlanner(dcp.DefaultLoadPlanner):
        def load_bytes(self, read_item, value: io.BytesIO) -> None:
            fqn = read_item.dest_index.fqn
            loaded = _load_weights_only(value, f"{folder}: the entry {shown(repr(fqn))}")
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], loaded)
            else:
                self.state_dict[fqn] = loaded

    try:
        dcp.load(state, checkpoint_id=str(folder), planner=WeightsOnlyLoadPlanner(), no_dist=True)
    except dcp.CheckpointException as err:  # torch wraps each rank's error with its traceback
        refused = [exc for exc, _ in err.failures.values() if isinstance(exc, UnsafeFileError)]
        if refused:
            raise refused[0] from None
        raise


# A saved config may build classes from these packages (Lightning's trainer parts, not its CLI,
# which builds whatever its own arguments name).
ALLOWED_CLASS_PACKAGES = (
    "relift_pl.", "callbacks.", "torch.optim.", "torch.nn.",
    *(f"lightning.pytorch.{part}." for part in (
        "trainer", "strategies", "loggers", "callbacks", "plugins", "accelerators", "profilers",
    )),
    "lightning.fabric.plugins.", "lightning.fabric.accelerators.",
)  # fmt: skip
_IMPORTABLE_ROOTS = ("relift_pl", "callbacks", "torch", "lightning")
_DOTTED_NAME = re.compile(r"[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)+")


@functools.cache
def project_targets(conf_dir: Path = CONF) -> frozenset[str]:
    """Every ``_target_`` the project's own configs (``conf/**/*.yaml``) name."""
    found = set()
    for path in conf_dir.rglob("*.yaml"):
        found |= {target for _, target in _targets(OmegaConf.load(path), "")}
    return frozenset(found)


def _raw(node: Any) -> Any:
    """A node's own value, unresolved (a container that is an interpolation: its string)."""
    return node._value()


def _is_container(node: Any) -> bool:
    """A dict or list node to walk into (not one that is an interpolation, missing or None)."""
    return isinstance(node, (DictConfig, ListConfig)) and isinstance(_raw(node), (dict, list))


def _nodes(node: Any, key: str):
    """(dotted key, node) for ``node`` and every node below it, parents first, unresolved."""
    yield key, node
    if not _is_container(node):
        return
    children = node if isinstance(node, DictConfig) else range(len(node))
    for child in children:
        yield from _nodes(node._get_node(child), f"{key}.{child}" if key else str(child))


def _targets(node: Any, key: str):
    """(key of the node, its ``_target_`` value) for every node that has one, raw (unresolved)."""
    for found, child in _nodes(node, key):
        if isinstance(child, DictConfig) and _is_container(child) and "_target_" in child:
            yield found, _raw(child._get_node("_target_"))


def _why_refused(target: Any) -> str | None:
    """Why a saved config's ``_target_`` may not be built (None when it may)."""
    if not isinstance(target, str) or not _DOTTED_NAME.fullmatch(target):
        return "is not a plain dotted name"
    if target in project_targets():
        return None
    if target.split(".", 1)[0] not in _IMPORTABLE_ROOTS:  # never import an unknown module
        return "is outside relift-pl, torch and Lightning"
    try:
        found = get_object(target)
    except Exception:  # noqa: BLE001 -- any failure to resolve is a refusal
        return "does not resolve"
    if not isinstance(found, type):
        return "is a function the project's configs do not name"
    if not f"{found.__module__}.".startswith(ALLOWED_CLASS_PACKAGES):
        return f"is the class {found.__module__}.{found.__qualname__}, outside the allowed packages"
    return None


# Resolvers a saved config may call: those the project's configs call outside ``hydra:``, oc.env
# only for relift-pl's own variables. A plain ``${key}`` reference calls none.
ALLOWED_RESOLVERS = ("oc.select", "oc.env", "relift_root", "openr1_sample")
_ENV_VARIABLE = re.compile(r"RELIFT_\w+")
# vLLM engine arguments a saved config may set: numbers, switches and one-word choices (fp8,
# awq, auto); a dotted name or a path may name code for vLLM to import (worker_cls,
# logits_processors, plugin files).
_PLAIN_WORD = re.compile(r"[\w-]+")


def _why_interpolation_refused(value: str) -> str | None:
    """Why a saved config's interpolation may not be resolved (None when it may): a resolver
    outside :data:`ALLOWED_RESOLVERS`, or a dict or list literal that would become a config node
    (``${oc.create:{_target_: ...}}``, ``${oc.select:missing,{_target_: ...}}``)."""
    from antlr4 import ParserRuleContext
    from omegaconf.errors import GrammarParseError
    from omegaconf.grammar.gen.OmegaConfGrammarParser import OmegaConfGrammarParser as Grammar
    from omegaconf.grammar_parser import parse

    try:
        tree = parse(value)
    except GrammarParseError:
        return "is not a valid interpolation"
    pending = [tree]
    while pending:
        ctx = pending.pop()
        if isinstance(ctx, (Grammar.DictContainerContext, Grammar.ListContainerContext)):
            return "passes a dict or list literal to a resolver"
        if isinstance(ctx, Grammar.InterpolationResolverContext):
            name = ctx.resolverName()
            if name.interpolation():
                return "names its resolver through an interpolation"
            if name.getText() not in ALLOWED_RESOLVERS:
                return (
                    f"calls the resolver {shown(name.getText())}, which a saved config may not call "
                    f"(allowed: {', '.join(ALLOWED_RESOLVERS)})"
                )
            arguments = ctx.sequence().element() if ctx.sequence() else []
            if name.getText() == "oc.env" and not (
                arguments and _ENV_VARIABLE.fullmatch(arguments[0].getText())
            ):
                return "reads an environment variable other than relift-pl's RELIFT_*"
        pending += [c for c in ctx.getChildren() if isinstance(c, ParserRuleContext)]
    return None


def _why_key_refused(key: str, node: Any) -> str | None:
    """Why the value at ``key`` may not come from a saved config (None when it may)."""
    value = _raw(node)
    if isinstance(value, str) and "${" in value:
        why = _why_interpolation_refused(value)
        if why is not None:
            return f"{why}; resolving it could build or run anything"
    leaf = key.rpartition(".")[2]
    if leaf == "trust_remote_code" and value not in (False, None):
        if key != "model.trust_remote_code" and value == "${model.trust_remote_code}":
            return None  # follows model.trust_remote_code, checked itself
        return "would run Python files from the model folder"
    plain = value is None or isinstance(value, (bool, int, float)) or (
        isinstance(value, str) and _PLAIN_WORD.fullmatch(value)
    )
    if ".engine_kwargs." in f".{key}" and not _is_container(node) and not plain:
        return "is a vLLM engine argument that may name code for vLLM to import"
    return None


def check_saved_config(cfg: DictConfig, source: str | Path, trusted_keys: Iterable[str] = ()) -> None:
    """Refuses a config read from ``source`` that could run code once this job builds it:

    - a ``_target_`` naming anything but classes in :data:`ALLOWED_CLASS_PACKAGES` or targets
      the project's configs name;
    - an interpolation calling a resolver outside :data:`ALLOWED_RESOLVERS`, or handing a
      resolver a dict or list literal (either could create a ``_target_`` at resolution);
    - a ``trust_remote_code`` key anywhere (``model.``, the vLLM engine's, its ``engine_kwargs``
      or ``hf_overrides``) that is not false (or the engine's ``${model.trust_remote_code}``);
    - a vLLM ``engine_kwargs`` value other than a number, a switch or a one-word choice.

    Keys this job sets itself are not checked.

    Args:
        cfg: the loaded config, unresolved.
        source: the file it came from (named in the error).
        trusted_keys: keys this job sets itself (its command line): not read from the file.

    Raises:
        UnsafeFileError: one line naming the key.
    """
    trusted = tuple(trusted_keys)
    for key, node in _nodes(cfg, ""):
        if key and _set_by(key, trusted):
            continue
        if isinstance(node, DictConfig) and _is_container(node) and "_target_" in node:
            name = f"{key}._target_" if key else "_target_"
            target = _raw(node._get_node("_target_"))
            why = _why_refused(target)
            if why is not None and not _set_by(name, trusted):
                raise UnsafeFileError(
                    f"{source}: {shown(name)}={shown(repr(target))} {why}; building it could run "
                    f"any code, so it is refused. Fix that key in the file if you trust it ({TRUST_NOTE})"
                )
        why = _why_key_refused(key, node)
        if why is not None:
            value = _raw(node)
            raise UnsafeFileError(
                f"{source}: {shown(key)}={shown(repr(value) if isinstance(value, str) else value)} "
                f"{why}, so it is refused; set {shown(key)} on the command line if you trust it "
                f"({TRUST_NOTE})"
            )


def _set_by(key: str, trusted: tuple[str, ...]) -> bool:
    """Whether ``key`` is one of ``trusted`` or inside one."""
    return any(key == t or key.startswith(f"{t}.") for t in trusted)
