"""The miniature study's machinery (``scripts/reproduce_toy.py``): running the runs
(:mod:`~relift_pl.study.runs`), the numbers read off them (:mod:`~relift_pl.study.stats`, pure),
the markdown tables (:mod:`~relift_pl.study.tables`), the figures (:mod:`~relift_pl.study.plots`)
and what a base makes of the hardest demonstrations (:mod:`~relift_pl.study.key_tokens`)."""
