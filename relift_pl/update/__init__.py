"""The two parameter updates of a training step, kept out of the module so it reads as the paper:
``rl_update`` (step 4, the policy gradient) and ``sft_update`` (step 5, the SFT step on buffered
demonstrations). Both run their micro-batches through :mod:`relift_pl.update.common`. They receive
a :class:`Learner` (the policy, one optimizer, the counters they change), never the module."""

from relift_pl.update.learner import Learner, UpdateCounters
from relift_pl.update.rl import LogprobCheck, rl_update
from relift_pl.update.sft import sft_backward, sft_update

__all__ = ["Learner", "LogprobCheck", "UpdateCounters", "rl_update", "sft_backward", "sft_update"]
