"""The update does what the config says: K mini-batches are K optimizer steps, the SFT loss added
to RL steps has its stated weight in each, the loss does not depend on micro-batching, metrics are
not divided by the micro-batch count, a skipped SFT step uses no demonstrations, and precision
plugins and offloading leave what they must alone."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from conftest import compose_cfg
from relift_pl.data import ReLIFTDataModule
from tests_helpers import fit_with_callbacks
from toy_overrides import QUIET_TOY

RUN = QUIET_TOY
# Plain SGD without clipping or decay: updates are linear in the gradient.
SGD = [
    "algorithm.rl_optimizer._target_=torch.optim.SGD", "algorithm.rl_optimizer.weight_decay=0",
    "algorithm.sft_optimizer._target_=torch.optim.SGD", "algorithm.sft_optimizer.weight_decay=0",
    "algorithm.rl_grad_clip=1e9", "algorithm.sft_grad_clip=1e9", "algorithm.pg_loss.entropy_coef=0",
]


class Metrics(L.Callback):
    """The reduced metrics of every training step (module.step_count -> values)."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, float]] = {}

    def on_train_batch_end(self, trainer, module, *args) -> None:
        self.steps[module.step_count] = {k: float(v) for k, v in trainer.callback_metrics.items()}


def _run(tmp_path, *overrides: str, callbacks=()):
    metrics = Metrics()
    cfg = compose_cfg([*RUN, *overrides], output_dir=tmp_path)
    return fit_with_callbacks(cfg, [metrics, *callbacks]), metrics.steps


@pytest.mark.parametrize(("k", "steps"), [(5, 5), (7, 7), (16, 16)])
def test_num_mini_batches_is_the_number_of_rl_optimizer_steps(tmp_path, k, steps):
    # B=4 prompts x G=4 = 16 rollouts; torch.chunk gave 4 chunks for 5 and 6 for 7.
    module, _ = _run(tmp_path, "algorithm=grpo", "max_steps=1", f"algorithm.num_mini_batches={k}")
    assert module.weights_version == steps


def test_more_mini_batches_than_rollouts_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"algorithm\.num_mini_batches=17 must be in \[1, 16\]"):
        _run(tmp_path, "algorithm=grpo", "max_steps=1", "algorithm.num_mini_batches=17")


def test_sft_loss_coef_applies_in_full_to_every_mini_batch_step(tmp_path):
    # Level 4: all rewards 0, advantages 0, so the RL gradient is only coef x the SFT gradient.
    # At a tiny lr both mini-batch steps see (almost) the same parameters, so each step's grad
    # norm equals the K=1 step's; dividing the coef by K halved it (47.62 vs 23.81).
    common = ["algorithm=rl_with_sft_loss", "max_steps=1", "data.train_rows.levels=[4]",
              "algorithm.rl_optimizer.lr=1e-9", *SGD]
    _, one = _run(tmp_path / "k1", *common, "algorithm.num_mini_batches=1")
    _, two = _run(tmp_path / "k2", *common, "algorithm.num_mini_batches=2")
    norm_one, norm_two = one[1]["rl/grad_norm"], two[1]["rl/grad_norm"]
    assert norm_one > 0
    assert norm_two == pytest.approx(norm_one, rel=1e-4)
    # The logged SFT term is the SFT loss itself (averaged over the two steps, not halved).
    assert two[1]["rl/sft_loss"] == pytest.approx(one[1]["rl/sft_loss"], rel=1e-4)


def test_constant_normaliser_does_not_depend_on_micro_batching(tmp_path):
    # SFT with agg_mode=constant and no loss_constant: the normaliser must be the batch's width,
    # not each micro-batch's trimmed width (2.140 vs 2.820 with micro-batches of 4 vs 1).
    common = ["algorithm=sft", "max_steps=1", "algorithm.sft_loss.agg_mode=constant", *SGD,
              "algorithm.sft_optimizer.lr=0.1"]
    whole, whole_metrics = _run(tmp_path / "a", *common, "algorithm.sft_micro_batch_size=4")
    split, split_metrics = _run(tmp_path / "b", *common, "algorithm.sft_micro_batch_size=1")
    assert split_metrics[1]["sft/loss"] == pytest.approx(whole_metrics[1]["sft/loss"], rel=1e-5)
    assert split_metrics[1]["sft/grad_norm"] == pytest.approx(whole_metrics[1]["sft/grad_norm"], rel=1e-5)
    for a, b in zip(whole.policy.parameters(), split.policy.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_logged_losses_are_not_divided_by_the_micro_batch_count(tmp_path):
    # Without an entropy term the SFT loss is its NLL; with 4 micro-batches the logged NLL was
    # a quarter of it (0.4436 vs 1.7745). Likewise the PG loss is the whole loss without KL or
    # entropy.
    _, steps = _run(tmp_path, "max_steps=1", "data.train_rows.levels=[4]",
                    "algorithm.sft_micro_batch_size=1", "algorithm.micro_batch_size=4",
                    "algorithm.pg_loss.entropy_coef=0")
    logged = steps[1]
    assert logged["sft/nll"] == pytest.approx(logged["sft/loss"], rel=1e-6)
    assert logged["rl/pg_loss"] == pytest.approx(logged["rl/loss"], rel=1e-6)
    assert logged["sft/loss"] > 0.1


class PoisonSFT(L.Callback):
    """NaN gradients for the SFT step of the first training step only."""

    def __init__(self) -> None:
        self.handle = None

    def on_rl_step_end(self, trainer, module, record) -> None:
        if module.step_count == 0:
            param = next(module.policy.parameters())
            self.handle = param.register_hook(lambda grad: grad * float("nan"))

    def on_train_batch_end(self, trainer, module, *args) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def test_a_skipped_sft_step_uses_no_demonstrations(tmp_path):
    module, steps = _run(tmp_path, "max_steps=2", "data.train_rows.levels=[4]",
                         callbacks=[PoisonSFT()])
    assert module.skipped_steps == 1 and module.sft_step == 2
    assert steps[1]["train/demos_used_frac"] == 0.0  # its 4 rows were never learned from
    assert len(module.demos_used) == 4  # the second SFT step's rows only


def test_an_sft_step_without_rows_is_skipped_not_a_crash(tmp_path, monkeypatch):
    # Every demonstration is longer than 1 token, so none is kept: the warm-up has nothing to
    # train on (pad_plan indexed an empty plan). Setup refuses such a run
    # (test_demonstration_check.py); the step must cope all the same.
    monkeypatch.setattr(ReLIFTDataModule, "check_demonstrations", lambda self, needed_by: None)
    module, _ = _run(tmp_path, "algorithm=sft_then_rl", "algorithm.sft_warmup_steps=1",
                     "max_steps=2", "data.max_demo_length=1")
    assert (module.rl_step, module.sft_step) == (1, 0)


def test_relift_with_a_warmup_runs(tmp_path):
    # The mining callback got a step without rewards during the warm-up and crashed.
    module, _ = _run(tmp_path, "algorithm.sft_warmup_steps=1", "max_steps=2",
                     "data.train_rows.levels=[4]")
    assert (module.rl_step, module.sft_step) == (1, 2)


def test_fused_log_prob_head_gives_the_same_update(tmp_path):
    common = ["max_steps=1", "data.train_rows.levels=[3,4]", *SGD, "algorithm.rl_optimizer.lr=0.1",
              "algorithm.sft_optimizer.lr=0.1"]
    full, full_steps = _run(tmp_path / "full", *common)
    fused, fused_steps = _run(tmp_path / "fused", *common, "algorithm.logprob_token_chunk=5")
    for key in ("rl/loss", "sft/loss"):
        assert fused_steps[1][key] == pytest.approx(full_steps[1][key], rel=1e-5, abs=1e-7)
    for a, b in zip(full.policy.parameters(), fused.policy.parameters()):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_rotary_frequencies_stay_float32_under_bf16_true(tmp_path):
    # Lightning's bf16-true converts every floating buffer; rounded inverse frequencies put
    # long positions off by radians (0.63 rad at 512, 10 at 8192 for the 7B's rope dims).
    module, _ = _run(tmp_path, "max_steps=1", "trainer.precision=bf16-true",
                     "model.allow_bf16_master_weights=true")
    buffers = {n: b for n, b in module.policy.named_buffers() if n.endswith("inv_freq")}
    assert buffers
    for name, buf in buffers.items():
        assert buf.dtype == torch.float32, name
        torch.testing.assert_close(buf, module._rotary_fp32[name], atol=0, rtol=0)
    assert next(module.policy.parameters()).dtype == torch.bfloat16  # the plugin did convert


def test_offloaded_sft_optimizer_state_lives_on_the_cpu_between_steps(tmp_path):
    # On CPU both places are the CPU, so the check is that the state moves through the offload
    # path at all and the SFT step still applies; on CUDA the GPU smoke script checks devices.
    module, _ = _run(tmp_path, "max_steps=2", "data.train_rows.levels=[4]",
                     "algorithm.offload_sft_optimizer=true")
    sft = module.optimizer("sft").optimizer
    states = [v for s in sft.state.values() for k, v in s.items() if torch.is_tensor(v) and k != "step"]
    assert states and all(v.device.type == "cpu" for v in states)
    assert module.sft_step == 2 and module.skipped_steps == 0


def test_metrics_are_logged_only_at_the_steps_that_produced_them(tmp_path):
    # M=8 with 4 hardest prompts per step: SFT steps at training steps 2 and 4 only. Lightning's
    # self.log repeated the last sft/* values at every step in between.
    import csv

    _run(tmp_path, "max_steps=4", "data.train_rows.levels=[4]", "algorithm.buffer_threshold=8")
    with open(next(tmp_path.rglob("metrics.csv"))) as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("step")]
    steps_with = {key: sorted({int(float(r["step"])) for r in rows if r.get(key)}) for key in ("sft/loss", "rl/loss")}
    assert steps_with == {"sft/loss": [2, 4], "rl/loss": [1, 2, 3, 4]}
