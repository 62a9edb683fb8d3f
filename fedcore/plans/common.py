"""What the plans share: the fingerprint of a run, and a plan whose server state is its aggregator's."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from typing_extensions import override

from fedcore.aggregation.base import Aggregator
from fedcore.aggregation.state import StateDict
from fedcore.config import Params, to_dict
from fedcore.federation.checkpoint import fingerprint
from fedcore.federation.engine import Plan, Stateful
from fedcore.plans.supervised import NOT_IN_FINGERPRINT


def params_fingerprint(params: Params, sections: Sequence[str], data_digest: str) -> str:
    """Sha256 of the params ``sections`` that change a run's result, the federation section, and the data.

    The federation section leaves out the knobs that cannot change a result (``NOT_IN_FINGERPRINT``: runner,
    workers, logging cadence, ...), so a run resumes whatever they are.
    """
    federation = {k: v for k, v in to_dict(params.federation).items() if k not in NOT_IN_FINGERPRINT}
    named = {name: to_dict(getattr(params, name)) for name in sections if name != "federation"}
    return fingerprint({**named, "federation": federation, "data": data_digest})


class AggregatorPlan(Plan):
    """A plan that starts from :attr:`initial` and whose server state is its :attr:`aggregator`'s.

    The aggregator's state (e.g. FedAdam's moments) is saved in every checkpoint under ``aggregator/`` and
    restored on resume.
    """

    #: The global state of round 0 (set by the subclass's constructor).
    initial: StateDict
    #: The server's rule of ``federation.aggregator``.
    aggregator: Aggregator

    @override
    def initial_state(self) -> StateDict:
        return self.initial

    @override
    def stateful(self) -> Mapping[str, Stateful]:
        return {"aggregator": self.aggregator}
