"""jobs: what a person types. The ``dr2`` command line (``cli.py``, ``parser.py``) and the commands built on the
library: submission to a Ray cluster (``submit.py``), the cost estimate (``estimate.py``), the benchmark
(``bench.py``), the demo, check-output and restore-faces. The run loop and the nightly job they start are library
code in :mod:`pipeline.runner`, which the Python API calls too. Depends on ``pipeline`` and ``dr2``; nothing imports
it.
"""
