"""DR2's start step omega by the official rule, in a module without torch: the pipeline's config resolves omega
when it is built (on the driver, before any worker starts) and should not pay for importing torch to do it."""

from __future__ import annotations


def default_omega(N: int, tau: int) -> int:
    """The start step omega of the official ``dr2e.py``: ``min(tau + k(N), 100)``.

    k = 5 for N = 1, 10 for N <= 2, 20 for N <= 4, 25 for N <= 8, 30 above. The result can be 100, which is
    outside the 100-step schedule: :func:`dr2.sampling.dr2_sample` rejects it (the official loop raises
    IndexError there).
    """
    if N == 1:
        k = 5
    elif 1 < N <= 2:
        k = 10
    elif 2 < N <= 4:
        k = 20
    elif 4 < N <= 8:
        k = 25
    else:
        k = 30
    return min(tau + k, 100)
