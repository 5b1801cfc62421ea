"""A quick toy configuration shared by the CPU run tests (a tiny, barely trained base)."""

QUICK_TOY = [
    # The first toy world: the mechanics tests were written on it (the default, toy2, is trained
    # in test_toy2_run.py); a later experiment= in a test's overrides wins.
    "experiment=toy",
    "num_threads=1",
    # A quick warm start with its own cache key: mechanics are tested here, not accuracy.
    "model.build.steps=20",
    "data.batch_size=4",
    "algorithm.group_size=4",
    "algorithm.buffer_threshold=4",
    "algorithm.micro_batch_size=8",
    "rollout.sampling.max_new_tokens=24",
    "callbacks.evaluation.max_problems=4",
    "callbacks.evaluation.k=2",
]

# QUICK_TOY without the side work: no evaluations, bar, checkpoints or export; metrics to CSV.
QUIET_TOY = [
    *QUICK_TOY,
    "logger=csv",
    "callbacks.evaluation.before_training=false",
    "callbacks.evaluation.after_training=false",
    "callbacks.progress_bar=null",
    "callbacks.checkpoint.every_n_train_steps=0",
    "callbacks.checkpoint.export_hf=false",
]
