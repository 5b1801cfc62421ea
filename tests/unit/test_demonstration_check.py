"""An algorithm that learns from demonstrations refuses a run that has none left after filtering
(one line naming the keys), and warns when filtering dropped a large share of them."""

from __future__ import annotations

import logging

import pytest
from hydra.utils import instantiate

from conftest import compose_cfg
from relift_pl.config import ConfigError
from relift_pl.data import ReLIFTDataModule
from relift_pl.toy.tokenizer import build_toy_tokenizer
from tests_helpers import config_names

SHORT, LONG = "2</think>\\boxed{2}", "1+1 is two" * 20 + "</think>\\boxed{2}"  # 18 and 218 tokens


def datamodule(demos: list[str | None], max_demo_length: int = 100) -> ReLIFTDataModule:
    rows = [{"id": f"r{i}", "problem": "1+1", "answer": "2", "demonstration": d} for i, d in enumerate(demos)]
    dm = ReLIFTDataModule(lambda: rows, build_toy_tokenizer(), batch_size=2, chat_template="model",
                          max_demo_length=max_demo_length)  # fmt: skip
    dm.setup("fit")
    return dm


@pytest.mark.parametrize("algorithm", config_names("algorithm"))
def test_every_algorithm_but_grpo_names_what_needs_demonstrations(algorithm):
    settings = instantiate(compose_cfg([f"algorithm={algorithm}"]).algorithm).demonstration_settings
    assert bool(settings) == (algorithm != "grpo"), settings


def test_all_demonstrations_dropped_as_too_long_is_refused():
    dm = datamodule([LONG, LONG])
    with pytest.raises(ConfigError) as err:
        dm.check_demonstrations(["algorithm.sft_loss_coef=0.1"])
    assert str(err.value) == (
        "algorithm.sft_loss_coef=0.1 needs demonstrations, but all 2 are longer than "
        "data.max_demo_length=100 tokens (the toy worlds tie it to rollout.sampling.max_new_tokens)"
        " and data.overlong_demos=drop dropped them: raise data.max_demo_length or set "
        "data.overlong_demos=truncate"
    )
    dm.check_demonstrations([])  # GRPO does not mind


def test_rows_without_demonstrations_are_refused():
    with pytest.raises(ConfigError, match=r"algorithm.sft_enabled=true needs demonstrations, but none of the 2 training rows has one: name the column with data.train_rows.columns.demonstration"):
        datamodule([None, None]).check_demonstrations(["algorithm.sft_enabled=true"])


def test_a_large_share_dropped_is_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        datamodule([SHORT, LONG, SHORT, SHORT]).check_demonstrations(["algorithm.mix_demos=true"])
        assert not caplog.records  # a quarter: fine
        datamodule([SHORT, LONG, LONG, SHORT]).check_demonstrations(["algorithm.mix_demos=true"])
    (message,) = [r.getMessage() for r in caplog.records]
    assert message.startswith("data: 2 of 4 demonstrations are longer than data.max_demo_length=100")
    assert message.endswith("algorithm.mix_demos=true learns from the other 2")
