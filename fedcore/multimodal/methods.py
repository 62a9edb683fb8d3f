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
``modality_mirror`` R rounds: av + w·audio / audio (modality-aware FL), then     the distilled student (before it,
                    the ``distill`` stage on the audio-visual clients            the audio branch)
==================  ==========================================================  ===================================

R is ``federation.rounds``, F ``modality.fusion_rounds`` and w ``modality.audio_loss_weight``. ModalityMirror's
phase 1 is modality-wise for audio: a client with video minimises ``CE(fused) + w·CE(audio branch)``, so it trains
the audio encoder *and* the audio head on audio alone and sends both, and the server averages the audio head over
every client holding audio (Σ_{k has audio} n_k θ_k / Σ n_k), not over the audio-only clients alone; w = 0 gives
the fused loss alone (the audio head then comes from the audio-only clients only: the behaviour before issue 21).
UniFL and Harmony's modality-wise stage already train the audio branch on every client with audio; MultiFL trains
the fused model only, by design (it serves audio-only clients with zero video). ModalityMirror's phase 2 is the
separate ``distill`` stage (its rounds are ``distill.rounds``), which takes any teacher and student registered in
MLflow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from fedcore.registry import Registry


@dataclass(frozen=True)
class Phase:
    """A run of rounds in which every client trains the tasks ``plan(has_video)`` (empty: it sits out).

    A client's loss is ``Σ_task weight(task)·CE_task``: ``video_weights`` gives the weights of a client with video
    (a task it does not name weighs 1); every weight of a client without video is 1.
    """

    name: str
    rounds: int
    plan: Callable[[bool], tuple[str, ...]]
    video_weights: Mapping[str, float] = field(default_factory=dict)

    def weights(self, has_video: bool) -> dict[str, float]:
        """The loss weight of each task of ``plan(has_video)``."""
        extra = self.video_weights if has_video else {}
        return {task: float(extra.get(task, 1.0)) for task in self.plan(has_video)}


@dataclass(frozen=True)
class AVMethod:
    """A registered audio-visual method (see the module table)."""

    name: str
    #: Phases given (total rounds R, fusion rounds F, audio loss weight w of the clients with video).
    phases: Callable[[int, int, float], list[Phase]]
    #: How audio-only clients are served: ``"branch"`` (audio encoder + audio head) or ``"zero_video"``.
    audio_eval: str
    #: Whether clients without video zero-fill it for tasks that read it.
    zero_fill: bool = False
    #: Whether the method trains the fused classifier (so that its audio-visual accuracy means something).
    fused: bool = True

    def schedule(self, rounds: int, fusion_rounds: int, audio_loss_weight: float = 1.0) -> list[tuple[int, Phase]]:
        """``(phase number from 1, phase)`` of every round 1..R, in round order (w: ``audio_loss_weight``)."""
        if not audio_loss_weight >= 0:
            raise ValueError(f"{self.name}: 'audio_loss_weight' must be >= 0. Got {audio_loss_weight!r}.")
        out: list[tuple[int, Phase]] = []
        for number, phase in enumerate(self.phases(rounds, fusion_rounds, audio_loss_weight), start=1):
            out.extend((number, phase) for _ in range(phase.rounds))
        return out


AV_METHODS: Registry[AVMethod] = Registry("av_method")


def _both(tasks: tuple[str, ...], audio_only: tuple[str, ...]) -> Callable[[bool], tuple[str, ...]]:
    return lambda has_video: tasks if has_video else audio_only


def _check_fusion_rounds(rounds: int, fusion_rounds: int) -> None:
    if not 0 < fusion_rounds < rounds:
        raise ValueError(f"harmony: 'fusion_rounds' must be in [1, rounds - 1] = [1, {rounds - 1}]. "
                         f"Got {fusion_rounds!r}.")


def _harmony_phases(rounds: int, fusion_rounds: int, audio_loss_weight: float) -> list[Phase]:
    _check_fusion_rounds(rounds, fusion_rounds)
    return [Phase("modality-wise", rounds - fusion_rounds, _both(("audio", "visual"), ("audio",))),
            Phase("fusion", fusion_rounds, _both(("fusion",), ()))]


def _mirror_phases(rounds: int, fusion_rounds: int, audio_loss_weight: float) -> list[Phase]:
    """Modality-aware FL: ``CE(fused) + w·CE(audio branch)`` with video (w = 0: fused alone); audio alone without."""
    with_video = ("av", "audio") if audio_loss_weight > 0 else ("av",)
    return [Phase("modality-aware", rounds, _both(with_video, ("audio",)), {"audio": audio_loss_weight})]


AV_METHODS.register("unifl")(lambda: AVMethod(
    "unifl", lambda r, f, w: [Phase("unimodal", r, _both(("audio",), ("audio",)))], "branch", fused=False))
AV_METHODS.register("multifl")(lambda: AVMethod(
    "multifl", lambda r, f, w: [Phase("multimodal", r, _both(("av",), ("av",)))], "zero_video", zero_fill=True))
AV_METHODS.register("harmony")(lambda: AVMethod("harmony", _harmony_phases, "branch"))
AV_METHODS.register("modality_mirror")(lambda: AVMethod("modality_mirror", _mirror_phases, "branch"))
