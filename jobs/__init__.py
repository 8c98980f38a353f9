"""jobs: what a person runs. The ``dr2`` command line, the archive restoration job, the nightly job,
submission to a Ray cluster. Depends on ``pipeline`` and ``dr2``.
"""
