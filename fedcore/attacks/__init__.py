"""Attacks on model updates (Byzantine clients); importing this package registers every attack in :data:`ATTACKS`.

Data poisoning (label flips, noise) lives in :mod:`fedcore.data.poison`; these attacks replace what a malicious
client *sends*, after honest local training, so they compose with data poisoning.
"""

from fedcore.attacks import updates  # noqa: F401  (registrations)
from fedcore.attacks.base import ATTACKS, UpdateAttack, attack_generator, choose_malicious, detection_counts

__all__ = ["ATTACKS", "UpdateAttack", "attack_generator", "choose_malicious", "detection_counts"]
