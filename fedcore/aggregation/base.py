"""Server-side aggregation: the client update record, the :class:`Aggregator` interface and its registry.

An aggregator maps the global state w_t and the client updates {(w^k_{t+1}, n_k, metrics_k)} of round t+1 to the
next global state w_{t+1}. Every entry of the state dict is aggregated, buffers included (BatchNorm statistics).

Every rule shares one procedure (:meth:`Aggregator.aggregate`):

1. **Screen.** An update whose keys, shapes or dtypes differ from the global state, or whose floating tensors hold
   NaN or Inf, or that lacks a metric the rule needs, is *rejected*: it is left out of the round, the reason is
   logged (logger ``fedcore.aggregation``) and returned. Clients whose training failed (``failed``: they raised)
   are rejected alike. If fewer than ``min_accepted`` updates are left (the quorum; at least one),
   :class:`QuorumError` lists every reason and the round is not applied. (A repeated client id or a
   ``num_examples`` that is not a positive int is a caller bug and raises.) :func:`screen_updates` is the same
   screening for callers that combine partial updates (modality-wise, depth-aware).
2. **Combine.** The rule's :meth:`Aggregator.combine` computes the floating entries from the accepted updates and
   says how much each client counted. Non-floating entries (e.g. BatchNorm's ``num_batches_tracked``) get FedAvg's
   weighted mean rounded to the nearest integer, in every rule.
3. **Report.** :class:`Aggregate` carries the new state, each client's effective weight, the clients the rule
   excluded per layer where it works per layer, and the *flagged* clients: rejected ones, and those whose
   effective weight fell below ``flag_ratio`` times their nominal weight (n_k/n for count-weighted rules, 1/K
   otherwise), or, for rules with their own criterion (layer-wise pruning), the clients that criterion names.
   Flagged clients are what detection precision and recall are computed from.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from fedcore.aggregation.state import StateDict
from fedcore.errors import AggregationError, QuorumError
from fedcore.registry import Registry

LOGGER = logging.getLogger("fedcore.aggregation")


@dataclass(frozen=True)
class ClientUpdate:
    """What one client returns after local training.

    Parameters
    ----------
    client_id : int
        Id of the client (the index in the partition).
    state : dict of str to Tensor
        The client's state dict after local training (the entries it sends), detached CPU tensors.
    num_examples : int
        n_k, the number of local training examples (the FedAvg weight).
    metrics : Mapping of str to float
        Local training metrics (``train_loss``, ``train_accuracy``, ...).
    weight : float, optional
        The update's weight in count-weighted rules, when it is not ``num_examples`` (e.g. n_k · g(l, d_k) in
        depth-aware partial aggregation; :mod:`fedcore.aggregation.partial`). A float > 0.
    """

    client_id: int
    state: StateDict
    num_examples: int
    metrics: Mapping[str, float] = field(default_factory=dict)
    weight: float | None = None

    @property
    def mass(self) -> float:
        """What the update weighs in count-weighted rules: ``weight``, or n_k."""
        return float(self.num_examples) if self.weight is None else float(self.weight)


@dataclass(frozen=True)
class Combination:
    """What a rule's :meth:`Aggregator.combine` returns.

    Parameters
    ----------
    state : dict of str to Tensor
        The combined floating entries (float64 or the global dtype; cast by the caller). Non-floating entries may
        be left out: the caller fills them.
    weights : Mapping of int to float
        Effective weight of each accepted client: its share of the result averaged over the floating entries
        (1/K each for a uniform mean, n_k/n for FedAvg, 0 for a client the rule left out).
    excluded_per_layer : Mapping of str to tuple of int
        For rules that decide per layer: the clients left out of each key (keys with none may be omitted).
    nominal : Mapping of int to float, optional
        The weights to compare ``weights`` with when flagging, when they differ from the rule's usual nominal
        weights this round (e.g. a FedAvg warm-up round of a uniform rule).
    flagged : frozenset of int, optional
        The clients the rule itself flags, for rules with an explicit criterion (layer-wise pruning); replaces
        the weight test.
    """

    state: StateDict
    weights: Mapping[int, float]
    excluded_per_layer: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    nominal: Mapping[int, float] | None = None
    flagged: frozenset[int] | None = None


@dataclass(frozen=True)
class Aggregate:
    """The result of one server step: the next global state and what the rule did with each client.

    Parameters
    ----------
    state : dict of str to Tensor
        w_{t+1}: same keys, shapes, dtypes and devices as the global state; shares no memory with the inputs.
    weights : Mapping of int to float
        Effective weight of every accepted client (see :class:`Combination`).
    flagged : frozenset of int
        Rejected clients and clients whose effective weight is below ``flag_ratio`` × their nominal weight.
    rejected : Mapping of int to str
        Clients left out by screening, with the reason.
    excluded_per_layer : Mapping of str to tuple of int
        Per-key exclusions of layer-wise rules (empty for the others).
    """

    state: StateDict
    weights: Mapping[int, float]
    flagged: frozenset[int]
    rejected: Mapping[int, str] = field(default_factory=dict)
    excluded_per_layer: Mapping[str, tuple[int, ...]] = field(default_factory=dict)


class Aggregator(ABC):
    """Combine client updates into the next global state.

    Subclasses implement :meth:`combine` for the floating entries of accepted updates; :meth:`aggregate` does
    the screening, the non-floating entries, the casting and the report. Server-side optimiser state (e.g.
    FedAdam's moments) is instance state, exposed through ``state_dict``/``load_state_dict`` for checkpoints.

    Parameters
    ----------
    flag_ratio : float
        A client is flagged when its effective weight is below ``flag_ratio`` × its nominal weight. [A] 0.5.
    """

    #: Nominal weight n_k/n (True) or 1/K (False); also whether scaling every n_k leaves the result unchanged.
    count_weighted: ClassVar[bool] = False
    #: Metrics each update must report (finite floats), e.g. ``train_loss`` for the loss-based rule.
    required_metrics: ClassVar[tuple[str, ...]] = ()

    def __init__(self, *, flag_ratio: float = 0.5) -> None:
        if not 0.0 <= flag_ratio <= 1.0:
            raise ValueError(f"{type(self).__name__}: 'flag_ratio' must be in [0, 1]. Got {flag_ratio!r}.")
        self.flag_ratio = flag_ratio

    @abstractmethod
    def combine(self, global_state: StateDict, updates: Sequence[ClientUpdate], server_round: int) -> Combination:
        """Combine the floating entries of the accepted ``updates`` (sorted by client id, at least one).

        Parameters
        ----------
        global_state : dict of str to Tensor
            w_t, the state the clients started from this round. Not modified.
        updates : sequence of ClientUpdate
            Screened updates in increasing ``client_id`` order. Not modified.
        server_round : int
            The round being aggregated, starting at 1.
        """

    def aggregate(self, global_state: StateDict, updates: Sequence[ClientUpdate], server_round: int, *,
                  failed: Mapping[int, str] | None = None, min_accepted: int = 1) -> Aggregate:
        """Return w_{t+1} and the report of the round (see the module docstring).

        Parameters
        ----------
        global_state : dict of str to Tensor
            w_t (not modified).
        updates : sequence of ClientUpdate
            The updates that arrived (may be empty when every client of the round failed).
        server_round : int
            The round being aggregated, starting at 1.
        failed : Mapping of int to str, optional
            Clients of the round whose training raised, with the reason; rejected and flagged like a bad update.
        min_accepted : int, default 1
            The quorum: fewer accepted updates and the round is not applied (:class:`QuorumError`).

        Raises
        ------
        QuorumError
            If fewer than ``min_accepted`` updates (and always: none) pass screening; the message lists each
            rejected client and its reason.
        AggregationError
            If a client id repeats (also between ``updates`` and ``failed``) or a ``num_examples`` is not an
            int > 0.
        """
        accepted, rejected = screen_round(global_state, updates, server_round, failed=failed,
                                          min_accepted=min_accepted, required_metrics=self.required_metrics,
                                          where=type(self).__name__)
        combination = self.combine(global_state, accepted, server_round)
        state: StateDict = {}
        integers = integer_average(global_state, accepted)
        for key, reference in global_state.items():
            value = combination.state[key] if reference.is_floating_point() else integers[key]
            state[key] = value.to(device=reference.device, dtype=reference.dtype)
        flagged = set(rejected)
        if combination.flagged is not None:
            flagged |= combination.flagged
        else:
            nominal = combination.nominal or nominal_weights(accepted, self.count_weighted)
            for update in accepted:
                if combination.weights[update.client_id] < self.flag_ratio * nominal[update.client_id] - 1e-12:
                    flagged.add(update.client_id)
        return Aggregate(state=state, weights=dict(combination.weights), flagged=frozenset(flagged),
                         rejected=rejected, excluded_per_layer=dict(combination.excluded_per_layer))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The rule's server-side state across rounds, for checkpoints (none by default; FedAdam: its moments)."""
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore what :meth:`state_dict` returned (a stateless rule takes nothing)."""
        if state:
            raise ValueError(f"{type(self).__name__}: keeps no state across rounds. Got {sorted(state)[:5]}.")

    def screen(
        self, global_state: StateDict, updates: Sequence[ClientUpdate]
    ) -> tuple[list[ClientUpdate], dict[int, str]]:
        """Split ``updates`` into accepted ones (sorted by client id) and rejected ones with their reason.

        Raises
        ------
        AggregationError
            If ``updates`` is empty, a client id repeats or a ``num_examples`` is not an int > 0.
        """
        return screen_updates(global_state, updates, required_metrics=self.required_metrics,
                              where=type(self).__name__)


def screen_updates(
    global_state: StateDict, updates: Sequence[ClientUpdate], *, partial: bool = False,
    required_metrics: Sequence[str] = (), where: str = "screen_updates",
) -> tuple[list[ClientUpdate], dict[int, str]]:
    """Split ``updates`` into accepted ones (sorted by client id) and rejected ones with their reason.

    Parameters
    ----------
    global_state : dict of str to Tensor
        The reference: keys, shapes and dtypes an update must match.
    updates : sequence of ClientUpdate
        The round's updates (non-empty).
    partial : bool, default False
        Whether an update may carry a non-empty subset of the keys (modality-wise and depth-aware rules); every
        entry it carries is still checked. Otherwise it must carry every key.
    required_metrics : sequence of str
        Metrics each update must report as finite numbers.
    where : str
        Name used in messages and the log.

    Returns
    -------
    accepted : list of ClientUpdate
        In increasing client id order.
    rejected : dict of int to str
        ``"client <id>: <reason>"`` per rejected client; each is also logged (logger ``fedcore.aggregation``).

    Raises
    ------
    AggregationError
        If ``updates`` is empty, a client id repeats or a ``num_examples`` is not an int > 0 (caller bugs).
    """
    if len(updates) == 0:
        raise AggregationError(f"{where}: 'updates' must be a non-empty sequence. Got {list(updates)!r}.")
    seen: set[int] = set()
    accepted: list[ClientUpdate] = []
    rejected: dict[int, str] = {}
    for update in sorted(updates, key=lambda u: u.client_id):
        client = update.client_id
        if client in seen:
            raise AggregationError(f"{where}: client {client} must report once per round. Got it twice.")
        seen.add(client)
        n_k = update.num_examples
        if isinstance(n_k, bool) or not isinstance(n_k, int) or n_k <= 0:
            raise AggregationError(f"{where}: client {client}: 'num_examples' must be an int > 0. Got {n_k!r}.")
        weight = update.weight
        if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))
                                   or not math.isfinite(weight) or weight <= 0):
            raise AggregationError(f"{where}: client {client}: 'weight' must be a finite float > 0 or None. "
                                   f"Got {weight!r}.")
        reason = _problem(global_state, update, partial, required_metrics)
        if reason is None:
            accepted.append(update)
        else:
            rejected[client] = f"client {client}: {reason}"
            LOGGER.warning("%s: rejected the update of client %d: %s", where, client, reason)
    return accepted, rejected


def screen_round(
    global_state: StateDict, updates: Sequence[ClientUpdate], server_round: int, *,
    failed: Mapping[int, str] | None = None, min_accepted: int = 1, partial: bool = False,
    required_metrics: Sequence[str] = (), also: Callable[[ClientUpdate], str | None] | None = None,
    where: str = "screen_round",
) -> tuple[list[ClientUpdate], dict[int, str]]:
    """The failure policy of one round: screen its updates, reject its failed clients, hold the quorum.

    Parameters
    ----------
    global_state, updates, partial, required_metrics, where
        As for :func:`screen_updates` (``updates`` may be empty here).
    server_round : int
        The round (for messages).
    failed : Mapping of int to str, optional
        Clients whose training raised, with the reason.
    min_accepted : int, default 1
        The quorum.
    also : callable, optional
        A rule's own check of an update that passed screening: the reason to reject it, or None.

    Returns
    -------
    accepted : list of ClientUpdate
        In increasing client id order.
    rejected : dict of int to str
        ``"client <id>: <reason>"`` of every client left out (failed, screened out, or refused by ``also``),
        sorted by client id.

    Raises
    ------
    QuorumError
        If fewer than ``min_accepted`` (and always: none) updates are accepted; the message lists every reason.
    AggregationError
        If a client both failed and sent an update, or on the caller bugs :func:`screen_updates` raises on.
    """
    failed = {int(k): str(v) for k, v in (failed or {}).items()}
    if both := sorted(failed.keys() & {u.client_id for u in updates}):
        raise AggregationError(f"{where}: clients {both} must either fail or send an update. Got both.")
    accepted, rejected = (screen_updates(global_state, updates, partial=partial, required_metrics=required_metrics,
                                         where=where) if updates else ([], {}))
    if also is not None:
        kept = []
        for update in accepted:
            if (reason := also(update)) is None:
                kept.append(update)
            else:
                rejected[update.client_id] = f"client {update.client_id}: {reason}"
                LOGGER.warning("%s: rejected the update of client %d: %s", where, update.client_id, reason)
        accepted = kept
    rejected = dict(sorted({**{c: f"client {c}: {r}" for c, r in failed.items()}, **rejected}.items()))
    check_quorum(where, server_round, len(accepted), rejected, min_accepted)
    return accepted, rejected


def check_quorum(where: str, server_round: int, num_accepted: int, rejected: Mapping[int, str],
                 min_accepted: int) -> None:
    """Raise :class:`QuorumError` if fewer than ``min_accepted`` (and at least one) updates were accepted.

    ``rejected`` holds ``"client <id>: <reason>"`` per client left out (failed or screened out); the message
    lists them all.
    """
    needed = max(1, int(min_accepted))
    if num_accepted >= needed:
        return
    total = num_accepted + len(rejected)
    reasons = "; ".join(rejected.values()) or "no client of the round sent an update"
    raise QuorumError(f"{where}: round {server_round} needs at least {needed} accepted update"
                      f"{'s' if needed != 1 else ''} (the quorum) of {total}. Got {num_accepted}. Rejected: "
                      f"{reasons}.", server_round=server_round, rejected=dict(rejected))


def _problem(global_state: StateDict, update: ClientUpdate, partial: bool,
             required_metrics: Sequence[str]) -> str | None:
    """Why ``update`` cannot be combined, or None."""
    missing = sorted(set(global_state) - set(update.state))
    extra = sorted(set(update.state) - set(global_state))
    if extra or (missing and not partial) or not update.state:
        return f"'state' must have the global keys; missing {missing[:5]!r}, extra {extra[:5]!r}"
    for key, tensor in update.state.items():
        reference = global_state[key]
        if not isinstance(tensor, torch.Tensor):
            return f"key {key!r} must be a tensor; got {type(tensor).__name__}"
        if tensor.shape != reference.shape:
            return f"key {key!r} must have shape {tuple(reference.shape)}; got {tuple(tensor.shape)!r}"
        if tensor.dtype != reference.dtype:
            return f"key {key!r} must have dtype {reference.dtype}; got {tensor.dtype}"
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return f"key {key!r} must hold finite values; got {_count_nonfinite(tensor)}"
    for name in required_metrics:
        value = update.metrics.get(name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return f"metric {name!r} must be a finite number; got {value!r}"
    return None


def check_updates(aggregator: Aggregator, global_state: StateDict, updates: Sequence[ClientUpdate]) -> None:
    """Raise :class:`AggregationError` unless every update passes ``aggregator``'s screening (for strict callers)."""
    _, rejected = aggregator.screen(global_state, updates)
    if rejected:
        raise AggregationError(f"{type(aggregator).__name__}: " + "; ".join(rejected.values()))


def floating_keys(global_state: StateDict) -> list[str]:
    """Keys of the floating entries of ``global_state``, in its order (what the rules combine)."""
    return [key for key, tensor in global_state.items() if tensor.is_floating_point()]


def stacked(updates: Sequence[ClientUpdate], key: str) -> torch.Tensor:
    """``(K, numel)`` float64 matrix of entry ``key`` of every update, rows in the order of ``updates``."""
    return torch.stack([u.state[key].detach().to("cpu", torch.float64).reshape(-1) for u in updates])


def nominal_weights(updates: Sequence[ClientUpdate], count_weighted: bool) -> dict[int, float]:
    """n_k/n per client if ``count_weighted`` (an update's ``weight`` in place of n_k when set), else 1/K."""
    if count_weighted:
        total = sum(u.mass for u in updates)
        return {u.client_id: u.mass / total for u in updates}
    return {u.client_id: 1.0 / len(updates) for u in updates}


def combine_weighted(
    global_state: StateDict,
    updates: Sequence[ClientUpdate],
    weights: Sequence[float],
    keys: Sequence[str] | None = None,
) -> StateDict:
    """Σ_k weights[k] · w^k (float64) for ``keys`` (default: the floating keys), terms summed in the given order."""
    out: StateDict = {}
    for key in floating_keys(global_state) if keys is None else keys:
        acc = torch.zeros(global_state[key].shape, dtype=torch.float64)
        for weight, update in zip(weights, updates, strict=True):
            if weight != 0.0:
                acc.add_(update.state[key].detach().to("cpu", torch.float64), alpha=weight)
        out[key] = acc
    return out


def integer_average(global_state: StateDict, updates: Sequence[ClientUpdate]) -> StateDict:
    """FedAvg's weighted mean of the non-floating entries, rounded to the nearest integer (ties to even)."""
    ordered = sorted(updates, key=lambda u: u.client_id)
    total = sum(u.mass for u in ordered)
    out: StateDict = {}
    for key, reference in global_state.items():
        if reference.is_floating_point():
            continue
        acc = torch.zeros(reference.shape, dtype=torch.float64)
        for update in ordered:
            acc.add_(update.state[key].detach().to("cpu", torch.float64), alpha=update.mass / total)
        out[key] = torch.round(acc)
    return out


def _count_nonfinite(tensor: torch.Tensor) -> str:
    num_nan = int(torch.isnan(tensor).sum())
    num_inf = int(torch.isinf(tensor).sum())
    return f"{num_nan} NaN and {num_inf} Inf of {tensor.numel()} values"


AGGREGATORS: Registry[Aggregator] = Registry("aggregator")

__all__ = [
    "AGGREGATORS",
    "Aggregate",
    "Aggregator",
    "ClientUpdate",
    "Combination",
    "StateDict",
    "check_quorum",
    "check_updates",
    "combine_weighted",
    "floating_keys",
    "integer_average",
    "nominal_weights",
    "screen_round",
    "screen_updates",
    "stacked",
]
