"""Update attacks: what each malicious client sends, the seeded ground truth, detection counts."""

from __future__ import annotations

from statistics import NormalDist

import pytest
import torch

from fedcore.aggregation import ClientUpdate
from fedcore.attacks import ATTACKS, attack_generator, choose_malicious, detection_counts
from fedcore.attacks.updates import alie_z

GLOBAL = {"w": torch.tensor([1.0, 2.0, 3.0]), "bn.running_mean": torch.tensor([0.5]), "n": torch.tensor(4)}


def _updates() -> list[ClientUpdate]:
    rows = [[1.5, 2.0, 2.0], [0.5, 3.0, 3.0], [1.0, 2.5, 4.0], [2.0, 1.0, 3.5]]
    return [ClientUpdate(i, {"w": torch.tensor(r), "bn.running_mean": torch.tensor([0.6]), "n": torch.tensor(5)},
                         10 + i, {"train_loss": 0.1 * i}) for i, r in enumerate(rows)]


def _attack(name: str, **options: object) -> list[ClientUpdate]:
    return ATTACKS.build(name, **options).corrupt(GLOBAL, _updates(), {1, 3}, ["w"], attack_generator(0, 1))


def test_none_sends_every_update_unchanged() -> None:
    out = _attack("none")
    for a, b in zip(out, _updates(), strict=True):
        assert torch.equal(a.state["w"], b.state["w"])


@pytest.mark.parametrize("name", ["sign_flip", "scaling", "gaussian", "alie", "nan"])
def test_only_malicious_clients_and_attacked_keys_change(name: str) -> None:
    out, honest = _attack(name), _updates()
    assert [u.client_id for u in out] == [0, 1, 2, 3]
    for a, b in zip(out, honest, strict=True):
        same = torch.equal(a.state["w"], b.state["w"])
        assert same == (a.client_id not in {1, 3})
        assert torch.equal(a.state["bn.running_mean"], b.state["bn.running_mean"])  # not in keys: untouched
        assert a.num_examples == b.num_examples and a.metrics == b.metrics
        assert a.state["w"].dtype == b.state["w"].dtype


def test_sign_flip_sends_the_reversed_amplified_update() -> None:
    out = _attack("sign_flip", sign_flip_scale=4.0)
    # client 1: delta = [-0.5, 1, 0] → w_t − 4·delta
    assert out[1].state["w"].tolist() == [3.0, -2.0, 3.0]


def test_scaling_boosts_the_update() -> None:
    out = _attack("scaling", scaling_boost=10.0)
    assert out[3].state["w"].tolist() == [11.0, -8.0, 8.0]  # delta [1, -1, 0.5]


def test_gaussian_is_seeded_per_round_and_centred_on_the_global_state() -> None:
    a, b = _attack("gaussian", gaussian_sigma=0.5), _attack("gaussian", gaussian_sigma=0.5)
    assert torch.equal(a[1].state["w"], b[1].state["w"])
    assert not torch.equal(a[1].state["w"], a[3].state["w"])
    other = ATTACKS.build("gaussian").corrupt(GLOBAL, _updates(), {1}, ["w"], attack_generator(0, 2))
    assert not torch.equal(other[1].state["w"], a[1].state["w"])
    big = ATTACKS.build("gaussian", gaussian_sigma=1.0).corrupt(
        {"w": torch.zeros(20000)}, [ClientUpdate(0, {"w": torch.ones(20000)}, 1)], {0}, ["w"], attack_generator(0, 1))
    assert abs(float(big[0].state["w"].mean())) < 0.05 and abs(float(big[0].state["w"].std()) - 1.0) < 0.05


def test_alie_sends_mean_minus_z_std_of_all_honest_updates() -> None:
    out = _attack("alie", alie_z=1.0)
    deltas = torch.stack([u.state["w"] - GLOBAL["w"] for u in _updates()]).double()
    expected = GLOBAL["w"].double() + deltas.mean(0) - deltas.std(0, unbiased=False)
    assert torch.allclose(out[1].state["w"].double(), expected, atol=1e-6)
    assert torch.equal(out[1].state["w"], out[3].state["w"])  # colluding attackers send one vector


def test_alie_z_max_follows_baruah_et_al() -> None:
    # K = 10, f = 2: s = floor(6) - 2 = 4, z = Φ⁻¹(6/10)
    assert alie_z(10, 2) == pytest.approx(NormalDist().inv_cdf(0.6))
    assert alie_z(10, 4) == pytest.approx(NormalDist().inv_cdf(0.8))


@pytest.mark.parametrize(("value", "check"), [("nan", torch.isnan), ("inf", torch.isinf)])
def test_nan_attack_fills_non_finite_values(value: str, check: object) -> None:
    out = _attack("nan", nan_value=value)
    assert bool(check(out[1].state["w"]).all()) and bool(torch.isfinite(out[0].state["w"]).all())


def test_malicious_clients_absent_from_the_round_are_ignored() -> None:
    out = ATTACKS.build("sign_flip").corrupt(GLOBAL, _updates()[:1], {1, 3}, ["w"], attack_generator(0, 1))
    assert torch.equal(out[0].state["w"], _updates()[0].state["w"])


@pytest.mark.parametrize(("name", "options"), [("sign_flip", {"sign_flip_scale": 0}),
                                               ("scaling", {"scaling_boost": -1}),
                                               ("gaussian", {"gaussian_sigma": 0}),
                                               ("alie", {"alie_z": -1}),
                                               ("nan", {"nan_value": "zero"})])
def test_bad_options_raise(name: str, options: dict[str, object]) -> None:
    with pytest.raises(ValueError, match=next(iter(options))):
        ATTACKS.build(name, **options)


def test_malicious_set_is_seeded_sized_and_stable() -> None:
    a = choose_malicious(10, 0.2, seed=0)
    assert len(a) == 2 and a == choose_malicious(10, 0.2, seed=0) and a <= set(range(10))
    assert len(choose_malicious(10, 0.4, seed=0)) == 4
    assert choose_malicious(10, 0.0, seed=0) == frozenset()
    assert {choose_malicious(10, 0.2, seed=s) for s in range(10)} != {a}
    with pytest.raises(ValueError, match="fraction"):
        choose_malicious(10, 1.5, seed=0)


def test_detection_counts_only_the_sampled_clients() -> None:
    assert detection_counts({1, 2, 7}, {1, 3, 9}, sampled=[1, 2, 3, 4]) == {"tp": 1, "fp": 1, "fn": 1}
    assert detection_counts(set(), set(), sampled=[0, 1]) == {"tp": 0, "fp": 0, "fn": 0}
