"""Plans of :func:`fedcore.federation.engine.run_rounds`: one per kind of federated training.

- :mod:`fedcore.plans.supervised`: FedAvg family, FedProx, FedU, FML, FedMLAC, local-only, and self-supervised
  pretraining with per-round downstream evaluation (FASSL).
- :mod:`fedcore.plans.earlyexit`: early exits: budget tiers, clients training to their exit depth (the
  :class:`~fedcore.earlyexit.train.ExitDepth` objective, FLOPs counted), depth-aware aggregation and a server rule.
- :mod:`fedcore.plans.modality`: modality-wise audio-visual training (UniFL, MultiFL, Harmony, ModalityMirror
  phase 1): per-phase tasks per client (the :class:`~fedcore.multimodal.train.AVTasks` objective), each parameter
  group aggregated over the clients that trained it.
- :mod:`fedcore.plans.distill`: federated distillation of a frozen teacher into a student (ModalityMirror phase 2;
  the :class:`~fedcore.multimodal.train.Distillation` objective), on the clients that hold the teacher's inputs.
- :mod:`fedcore.plans.common`: what plans share (the run's fingerprint; :class:`AggregatorPlan`, whose server state
  is its aggregator's).
"""
