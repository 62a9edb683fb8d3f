"""What the plans share: the fingerprint of a run (what a checkpoint must match to be resumed)."""

from __future__ import annotations

from collections.abc import Sequence

from fedcore.config import Params, to_dict
from fedcore.federation.checkpoint import fingerprint
from fedcore.plans.supervised import NOT_IN_FINGERPRINT


def params_fingerprint(params: Params, sections: Sequence[str], data_digest: str) -> str:
    """Sha256 of the params ``sections`` that change a run's result, the federation section, and the data.

    The federation section leaves out the knobs that cannot change a result (``NOT_IN_FINGERPRINT``: runner,
    workers, logging cadence, ...), so a run resumes whatever they are.
    """
    federation = {k: v for k, v in to_dict(params.federation).items() if k not in NOT_IN_FINGERPRINT}
    named = {name: to_dict(getattr(params, name)) for name in sections if name != "federation"}
    return fingerprint({**named, "federation": federation, "data": data_digest})
