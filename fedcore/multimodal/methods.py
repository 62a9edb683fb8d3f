"""Audio-visual federated methods as phases of per-client task plans (registry :data:`AV_METHODS`).

Every method trains the same :class:`~fedcore.multimodal.models.AVModel` with modality-wise aggregation; they
differ in which tasks (:data:`~fedcore.multimodal.train.LOCAL_TASKS`) each client trains in each phase, and in how
the audio-only test clients are served:

==================  ==========================================================  ===================================
method              phases: tasks of an audio-visual client / of an audio-only   audio-only clients use
==================  ==========================================================  ===================================
``unifl``           R rounds: audio / audio                                      the audio branch
``multifl``         R rounds: av / av with zero-filled video                      the AV model with zero video
``harmony``         R − F rounds: audio + visual / audio (modality-wise FL);     the audio branch
                    F rounds: fusion on frozen encoders / — (fusion learning)
``modality_mirror`` R rounds: av / audio (modality-aware FL), then the           the distilled student (before it,
                    ``distill`` stage on the audio-visual clients                the audio branch)
==================  ==========================================================  ===================================

R is ``federation.rounds`` and F ``modality.fusion_rounds``. ModalityMirror's phase 2 is the separate ``distill``
stage (its rounds are ``distill.rounds``), which takes any teacher and student registered in MLflow.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fedcore.registry import Registry


@dataclass(frozen=True)
class Phase:
    """A run of rounds in which every client trains the tasks ``plan(has_video)`` (empty: it sits out)."""

    name: str
    rounds: int
    plan: Callable[[bool], tuple[str, ...]]


@dataclass(frozen=True)
class AVMethod:
    """A registered audio-visual method (see the module table)."""

    name: str
    #: Phases given (total rounds R, fusion rounds F).
    phases: Callable[[int, int], list[Phase]]
    #: How audio-only clients are served: ``"branch"`` (audio encoder + audio head) or ``"zero_video"``.
    audio_eval: str
    #: Whether clients without video zero-fill it for tasks that read it.
    zero_fill: bool = False
    #: Whether the method trains the fused classifier (so that its audio-visual accuracy means something).
    fused: bool = True

    def schedule(self, rounds: int, fusion_rounds: int) -> list[tuple[int, Phase]]:
        """``(phase number from 1, phase)`` of every round 1..R, in round order."""
        out: list[tuple[int, Phase]] = []
        for number, phase in enumerate(self.phases(rounds, fusion_rounds), start=1):
            out.extend((number, phase) for _ in range(phase.rounds))
        return out


AV_METHODS: Registry[AVMethod] = Registry("av_method")


def _both(tasks: tuple[str, ...], audio_only: tuple[str, ...]) -> Callable[[bool], tuple[str, ...]]:
    return lambda has_video: tasks if has_video else audio_only


def _check_fusion_rounds(rounds: int, fusion_rounds: int) -> None:
    if not 0 < fusion_rounds < rounds:
        raise ValueError(f"harmony: 'fusion_rounds' must be in [1, rounds - 1] = [1, {rounds - 1}]. "
                         f"Got {fusion_rounds!r}.")


def _harmony_phases(rounds: int, fusion_rounds: int) -> list[Phase]:
    _check_fusion_rounds(rounds, fusion_rounds)
    return [Phase("modality-wise", rounds - fusion_rounds, _both(("audio", "visual"), ("audio",))),
            Phase("fusion", fusion_rounds, _both(("fusion",), ()))]


AV_METHODS.register("unifl")(lambda: AVMethod(
    "unifl", lambda r, f: [Phase("unimodal", r, _both(("audio",), ("audio",)))], "branch", fused=False))
AV_METHODS.register("multifl")(lambda: AVMethod(
    "multifl", lambda r, f: [Phase("multimodal", r, _both(("av",), ("av",)))], "zero_video", zero_fill=True))
AV_METHODS.register("harmony")(lambda: AVMethod("harmony", _harmony_phases, "branch"))
AV_METHODS.register("modality_mirror")(lambda: AVMethod(
    "modality_mirror", lambda r, f: [Phase("modality-aware", r, _both(("av",), ("audio",)))], "branch"))
