"""Failure policy of a round: how many of its clients must deliver an acceptable update (the quorum).

A client whose training raises, or whose update fails screening (non-finite values, wrong keys or shapes; see
:func:`fedcore.aggregation.base.screen_updates`), is rejected with its reason and the round goes on with the others,
as long as at least :func:`required_updates` of the round's jobs are accepted. Below that the round is not applied
(:class:`~fedcore.errors.QuorumError`): the caller keeps its last checkpoint and stops with the message.
"""

from __future__ import annotations

import math

__all__ = ["required_updates"]


def required_updates(min_accepted: int | float, num_jobs: int) -> int:
    """The quorum of a round with ``num_jobs`` client jobs.

    Parameters
    ----------
    min_accepted : int or float
        ``federation.min_accepted``: an int >= 1 is a count of clients; a float in (0, 1] is a share of the round's
        jobs, rounded up (0.5 of 5 jobs: 3).
    num_jobs : int
        Clients asked to train this round (>= 0).

    Returns
    -------
    int
        At least 1, at most ``max(num_jobs, 1)``: a count above the round's jobs asks for every job.

    Raises
    ------
    ValueError
        If ``min_accepted`` is not an int >= 1 or a float in (0, 1], or ``num_jobs`` is negative.
    """
    if isinstance(num_jobs, bool) or not isinstance(num_jobs, int) or num_jobs < 0:
        raise ValueError(f"required_updates: 'num_jobs' must be an int >= 0. Got {num_jobs!r}.")
    if isinstance(min_accepted, bool) or not isinstance(min_accepted, (int, float)):
        raise ValueError(f"required_updates: 'min_accepted' must be an int >= 1 or a float in (0, 1]. "
                         f"Got {min_accepted!r}.")
    if isinstance(min_accepted, int):
        if min_accepted < 1:
            raise ValueError(f"required_updates: 'min_accepted' must be an int >= 1 or a float in (0, 1]. "
                             f"Got {min_accepted!r}.")
        needed = min_accepted
    else:
        if not (0.0 < min_accepted <= 1.0):
            raise ValueError(f"required_updates: 'min_accepted' must be an int >= 1 or a float in (0, 1]. "
                             f"Got {min_accepted!r}.")
        needed = math.ceil(min_accepted * num_jobs - 1e-9)
    return max(1, min(needed, max(num_jobs, 1)))
