"""Plans of :func:`fedcore.federation.engine.run_rounds`: one per kind of federated training.

- :mod:`fedcore.plans.supervised`: FedAvg family, FedProx, FedU, FML, FedMLAC, local-only, and self-supervised
  pretraining with per-round downstream evaluation (FASSL).
"""
