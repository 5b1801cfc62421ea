"""Checkpoint folders and run folders from elsewhere: nothing they pickle or name gets to run.

Each crafted file would create a marker file if it ran; the tests check that it is refused, in
one line naming the file (or key), and that the marker does not exist.
"""

from __future__ import annotations

import io
import json
import pickle
import warnings
import zipfile

import pytest
import torch
import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf
from test_evaluate import compose_eval

from conftest import compose_cfg
from relift_pl.checkpoint import check_checkpoint_file, resolve_ckpt_path
from relift_pl.evaluate import _load_sharded_weights, load_checkpoint_weights, run_config
from relift_pl.untrusted import load_distributed_checkpoint


class CreatesFile:
    """Unpickling it creates ``path``: a stand-in for any code a pickle can run."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


# Non-tensor entries of an FSDP2 checkpoint's optimizer state: torch pickles them into the shards.
OPTIMIZER = {"param_groups": [{"lr": 1e-6, "betas": (0.9, 0.999), "foreach": None, "params": ["w"]}]}


def sharded_checkpoint(folder, meta: dict | None = None, state: dict | None = None):
    """A real FSDP2-style checkpoint folder: torch's distributed checkpoint (``state``, default
    weights and optimizer settings) plus Lightning's meta.pt."""
    state = state or {"state_dict": {"w": torch.zeros(2, 3)}, "optimizer_0": OPTIMIZER}
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    torch.save(meta or {"global_step": 3, "relift": {"step_count": 3}}, folder / "meta.pt")
    return folder


def refusal(call) -> str:
    with pytest.raises(ValueError) as err:
        call()
    message = str(err.value)
    assert "\n" not in message and "refused" in message
    return message


def test_a_folder_this_project_writes_passes_and_loads(tmp_path):
    weights = torch.arange(6.0).reshape(2, 3)
    folder = sharded_checkpoint(tmp_path / "last.ckpt", state={"state_dict": {"w": weights}, "optimizer_0": OPTIMIZER})
    assert check_checkpoint_file(folder) == folder
    # The weights-only load reads tensors and the optimizer's plain values alike.
    state = {"state_dict": {"w": torch.zeros(2, 3)},
             "optimizer_0": {"param_groups": [{"lr": 0.0, "betas": (0, 0), "foreach": True, "params": []}]}}
    load_distributed_checkpoint(state, folder)
    assert torch.equal(state["state_dict"]["w"], weights) and state["optimizer_0"] == OPTIMIZER


@pytest.mark.parametrize("how", ["train.py ckpt_path=", "evaluate.py ckpt_path="])
def test_a_crafted_meta_pt_is_refused_without_running(tmp_path, how):
    marker = tmp_path / "ran"
    folder = sharded_checkpoint(tmp_path / "last.ckpt", {"relift": CreatesFile(marker)})
    if how.startswith("train"):
        message = refusal(lambda: resolve_ckpt_path(str(folder), tmp_path))
    else:  # refused before the module is touched
        message = refusal(lambda: load_checkpoint_weights(None, str(folder)))
    assert not marker.exists()
    assert message.startswith(f"{folder / 'meta.pt'} pickles the global ")


@pytest.mark.parametrize("how", ["train.py ckpt_path=", "evaluate.py ckpt_path="])
def test_a_crafted_shard_entry_is_refused_without_running(tmp_path, how):
    # torch pickles a non-tensor entry into the shard and unpickles it with anything allowed.
    marker = tmp_path / "ran"
    evil = {"state_dict": {"w": torch.zeros(2, 3)}, "optimizer_0": {"state": CreatesFile(marker)}}
    folder = sharded_checkpoint(tmp_path / "last.ckpt", state=evil)
    if how.startswith("train"):
        message = refusal(lambda: resolve_ckpt_path(str(folder), tmp_path))
    else:
        message = refusal(lambda: load_checkpoint_weights(None, str(folder)))
    assert not marker.exists()
    assert message.startswith(f"{folder}: the entry 'optimizer_0.state' pickles the global io.open,")


def test_sharded_weights_are_read_weights_only(tmp_path):
    # A weight stored as a pickle under the module's own key: evaluate.py's own load reads it
    # weights-only, even past the folder check.
    marker = tmp_path / "ran"
    folder = sharded_checkpoint(tmp_path / "last.ckpt", state={"state_dict": {"w": CreatesFile(marker)}})

    class Module:
        def state_dict(self):
            return {"w": torch.zeros(2, 3)}

    message = refusal(lambda: _load_sharded_weights(Module(), folder))
    assert not marker.exists()
    assert message.startswith(f"{folder}: the entry 'state_dict.w' pickles the global io.open,")


def test_a_crafted_single_file_checkpoint_is_refused_in_one_line(tmp_path):
    marker, path = tmp_path / "ran", tmp_path / "last.ckpt"
    torch.save({"state_dict": {}, "relift": CreatesFile(marker)}, path)
    message = refusal(lambda: load_checkpoint_weights(None, str(path)))
    assert not marker.exists() and message.startswith(f"{path} pickles the global ")


def test_a_crafted_distributed_checkpoint_metadata_is_refused_without_running(tmp_path):
    marker = tmp_path / "ran"
    folder = sharded_checkpoint(tmp_path / "last.ckpt")
    (folder / ".metadata").write_bytes(pickle.dumps(CreatesFile(marker)))
    message = refusal(lambda: check_checkpoint_file(folder))
    assert not marker.exists()
    assert message.startswith(f"{folder / '.metadata'} pickles the global ")


def with_pickle(path, data: bytes):
    """Replaces the pickle inside a ``torch.save`` file (a zip) with ``data``."""
    files = zipfile.ZipFile(io.BytesIO(path.read_bytes()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for info in files.infolist():
            archive.writestr(info, data if info.filename.endswith("/data.pkl") else files.read(info))
    path.write_bytes(out.getvalue())


# A global named with terminal escapes (clear screen, red) and, in protocol 4, a line break (no
# such module exists: what these test is the message).
ESCAPES = b"\x1b[2J\x1b[31mbuiltins"
MARKER_ARGS = b"X\x06\x00\x00\x00markerX\x01\x00\x00\x00w\x86R."  # ("marker", "w"), call, stop
PROTOCOL_2 = b"\x80\x02c" + ESCAPES + b"\nopen\n" + MARKER_ARGS
MODULE = ESCAPES + b"\nok"
PROTOCOL_4 = b"\x80\x04\x8c" + bytes([len(MODULE)]) + MODULE + b"\x8c\x04open\x93" + MARKER_ARGS


def test_names_from_a_file_are_shown_escaped(tmp_path):
    folder = sharded_checkpoint(tmp_path / "last.ckpt")
    with_pickle(folder / "meta.pt", PROTOCOL_2)
    message = refusal(lambda: check_checkpoint_file(folder))
    assert message.startswith(f"{folder / 'meta.pt'} pickles the global '\\x1b[2J\\x1b[31mbuiltins.open',")
    (folder / ".metadata").write_bytes(PROTOCOL_4)
    message = refusal(lambda: check_checkpoint_file(folder))
    assert message.startswith(f"{folder / '.metadata'} pickles the global '\\x1b[2J\\x1b[31mbuiltins\\nok.open',")
    # A config key with a line break.
    run = saved_run(tmp_path / "run", **{"callbacks": {"evil\n\x1b[2J": {"_target_": "shutil.copy"}}})
    message = refusal(lambda: run_config_of(run))
    assert message.startswith(f"{run / '.hydra' / 'config.yaml'}: 'callbacks.evil\\n\\x1b[2J._target_'='shutil.copy' ")


def test_a_truncated_metadata_is_still_called_incomplete(tmp_path):
    folder = sharded_checkpoint(tmp_path / "last.ckpt")
    (folder / ".metadata").write_bytes((folder / ".metadata").read_bytes()[:40])
    with pytest.raises(ValueError, match="is incomplete or corrupted"):
        check_checkpoint_file(folder)


def saved_run(tmp_path, **keys):
    """A run folder whose .hydra/config.yaml is the default config with ``keys`` set."""
    cfg = compose_cfg([], output_dir=tmp_path)
    for key, value in keys.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    (tmp_path / ".hydra").mkdir(parents=True)
    (tmp_path / "final_model").mkdir()  # what evaluate.py would score
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")
    return tmp_path


def run_config_of(run, *overrides):
    overrides = [f"run_dir={run}", *overrides]
    return run_config(compose_eval(overrides, run / "eval"), overrides)


@pytest.mark.parametrize(
    ("target", "why"),
    [
        ("shutil.copy", "is outside relift-pl, torch and Lightning"),
        ("builtins.exec", "is outside relift-pl, torch and Lightning"),
        ("relift_pl.export.shutil.copy", "is a function the project's configs do not name"),
        ("torch.load", "is a function the project's configs do not name"),
        (
            "lightning.pytorch.cli.LightningCLI",
            "is the class lightning.pytorch.cli.LightningCLI, outside the allowed packages",
        ),
        ("${oc.env:HOME}", "is not a plain dotted name"),
    ],
)
def test_a_run_folder_config_builds_only_allowed_classes(tmp_path, target, why):
    marker = tmp_path / "ran"
    evil = {"_target_": target, "src": __file__, "dst": str(marker)}
    run = saved_run(tmp_path, **{"callbacks.evil": evil})
    message = refusal(lambda: run_config_of(run))
    assert message == (
        f"{run / '.hydra' / 'config.yaml'}: callbacks.evil._target_={target!r} {why}; building it "
        "could run any code, so it is refused. Fix that key in the file if you trust it "
        "(relift-pl loads only what cannot run code; see README, Untrusted files)"
    )
    assert not marker.exists()


def test_a_run_folder_may_name_torch_and_lightning_classes_and_the_command_line_anything(tmp_path):
    run = saved_run(tmp_path, **{
        "algorithm.rl_optimizer._target_": "torch.optim.SGD",  # not in the project's configs
        "callbacks.timer": {"_target_": "lightning.pytorch.callbacks.Timer"},
        "reward._target_": "stub_rewards.HashReward",  # a test class: not from the file...
    })  # fmt: skip
    with pytest.raises(ValueError, match=r"reward\._target_='stub_rewards\.HashReward'"):
        run_config_of(run)
    # ...but this job's own command line says so.
    assert run_config_of(run, "reward._target_=stub_rewards.HashReward").callbacks.timer


def refused_key(run, key: str, value: str, why: str) -> str:
    """The refusal of a saved config's ``key`` holding ``value``."""
    return (
        f"{run / '.hydra' / 'config.yaml'}: {key}={value} {why}, so it is refused; set {key} on the "
        "command line if you trust it (relift-pl loads only what cannot run code; see README, "
        "Untrusted files)"
    )


RESOLVING = "; resolving it could build or run anything"


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (
            "${oc.create:{_target_: shutil.copy, src: 'SRC', dst: 'DST'}}",
            "calls the resolver oc.create, which a saved config may not call (allowed: oc.select, "
            "oc.env, relift_root, openr1_sample)",
        ),
        (
            """${oc.decode:'{_target_: shutil.copy, src: "SRC", dst: "DST"}'}""",
            "calls the resolver oc.decode, which a saved config may not call (allowed: oc.select, "
            "oc.env, relift_root, openr1_sample)",
        ),
        (
            "${oc.select:nowhere,{_target_: shutil.copy, src: 'SRC', dst: 'DST'}}",
            "passes a dict or list literal to a resolver",
        ),
        ("${${paths.root_dir}:x}", "names its resolver through an interpolation"),
        ("${oc.env:HOME}", "reads an environment variable other than relift-pl's RELIFT_*"),
    ],
)
def test_a_run_folder_config_cannot_hide_a_target_in_a_resolver(tmp_path, value, why):
    # Each value resolves to a node whose _target_ copies a file (the unresolved tree has none).
    marker = tmp_path / "ran"
    value = value.replace("SRC", __file__).replace("DST", str(marker))
    run = saved_run(tmp_path, **{"callbacks.evil": value})
    message = refusal(lambda: run_config_of(run))
    assert message == refused_key(run, "callbacks.evil", repr(value), why + RESOLVING)
    assert not marker.exists()


@pytest.mark.parametrize("experiment", ["paper_rehearsal", "relift_qwen_math_7b", "toy"])
def test_the_projects_own_run_configs_pass(tmp_path, experiment):
    # paths.data_dir: ${oc.env:RELIFT_DATA_DIR,...}; the vLLM engine's ${oc.select:...} and
    # trust_remote_code: ${model.trust_remote_code}; the rehearsal's ${openr1_sample:...}.
    cfg = compose_cfg([f"experiment={experiment}"], output_dir=tmp_path)
    (tmp_path / ".hydra").mkdir()
    (tmp_path / "final_model").mkdir()
    OmegaConf.save(cfg, tmp_path / ".hydra" / "config.yaml")
    assert run_config_of(tmp_path).model.name_or_path == str(tmp_path / "final_model")


@pytest.mark.parametrize(
    "key",
    [
        "model.trust_remote_code",
        "model.config_overrides.trust_remote_code",  # from_pretrained's own argument
        "rollout.engine.trust_remote_code",
        "rollout.engine.engine_kwargs.trust_remote_code",
        "rollout.engine.hf_overrides.trust_remote_code",
    ],
)
def test_a_run_folder_cannot_turn_on_remote_code(tmp_path, key):
    run = saved_run(tmp_path, **{key: True})
    message = refusal(lambda: run_config_of(run))
    assert message == refused_key(run, key, "True", "would run Python files from the model folder")
    if key == "model.trust_remote_code":
        assert run_config_of(run, "model.trust_remote_code=true").model.trust_remote_code is True


def test_a_run_folder_names_no_code_for_vllm_to_import(tmp_path):
    key = "rollout.engine.engine_kwargs.worker_extension_cls"
    run = saved_run(tmp_path, **{key: "shutil.copy"})
    message = refusal(lambda: run_config_of(run))
    assert message == refused_key(run, key, "'shutil.copy'", "is a vLLM engine argument that may name code for vLLM to import")
    # Numbers, switches and one-word choices are engine settings.
    settings = {"max_num_seqs": 8, "enforce_eager": True, "kv_cache_dtype": "fp8", "swap_space": 0.5}
    run = saved_run(tmp_path / "plain", **{"rollout.engine.engine_kwargs": settings})
    assert run_config_of(run).rollout.engine.engine_kwargs == settings


def remote_code_model(folder, marker):
    """A model folder whose auto_map names its own Python file, which creates ``marker`` on import."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"},
    }))  # fmt: skip
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    return folder


def test_config_overrides_cannot_turn_on_remote_code(tmp_path):
    from relift_pl.models import load_policy

    marker = tmp_path / "ran"
    folder = remote_code_model(tmp_path / "final_model", marker)
    with pytest.raises(ValueError, match="^model.config_overrides.trust_remote_code would let the model folder run"):
        load_policy(str(folder), config_overrides={"trust_remote_code": True})
    assert not marker.exists()


@pytest.mark.parametrize("script", ["train.py", "train.py shard", "evaluate.py", "evaluate.py resolver"])
def test_the_scripts_refuse_crafted_folders_in_one_line(tmp_path, script):
    from test_cli import run

    marker = tmp_path / "ran"
    if script == "train.py":  # resuming from a downloaded checkpoint folder
        folder = sharded_checkpoint(tmp_path / "last.ckpt", {"relift": CreatesFile(marker)})
        done = run(script, "trainer=fsdp", f"ckpt_path={folder}", f"hydra.run.dir={tmp_path / 'out'}")
        expected = f"Error: {folder / 'meta.pt'} pickles the global "
    elif script == "train.py shard":  # ... whose optimizer state (in the shards) pickles code
        evil = {"state_dict": {"w": torch.zeros(2, 3)}, "optimizer_0": {"state": CreatesFile(marker)}}
        folder = sharded_checkpoint(tmp_path / "last.ckpt", state=evil)
        done = run("train.py", "trainer=fsdp", f"ckpt_path={folder}", f"hydra.run.dir={tmp_path / 'out'}")
        expected = f"Error: {folder}: the entry 'optimizer_0.state' pickles the global io.open,"
    elif script == "evaluate.py":  # scoring a downloaded run folder
        evil = {"_target_": "shutil.copy", "src": __file__, "dst": str(marker)}
        run_dir = saved_run(tmp_path / "run", **{"callbacks.evil": evil})
        done = run(script, f"run_dir={run_dir}", f"hydra.run.dir={tmp_path / 'out'}")
        expected = f"Error: {run_dir / '.hydra' / 'config.yaml'}: callbacks.evil._target_='shutil.copy'"
    else:  # ... whose _target_ appears only when a resolver runs
        evil = f"${{oc.create:{{_target_: shutil.copy, src: '{__file__}', dst: '{marker}'}}}}"
        run_dir = saved_run(tmp_path / "run", **{"callbacks.evil": evil})
        done = run("evaluate.py", f"run_dir={run_dir}", f"hydra.run.dir={tmp_path / 'out'}")
        expected = f"Error: {run_dir / '.hydra' / 'config.yaml'}: callbacks.evil={evil!r} calls the resolver oc.create,"
    assert not marker.exists()
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert done.stderr.splitlines()[-1].startswith(expected)
