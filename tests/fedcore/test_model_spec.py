"""Architecture specs: every logged architecture rebuilds from JSON + safetensors, and hostile files are refused.

The spec and the weights come from others: each bad file below must be refused with a message that names what is
wrong, before a model of the (possibly hostile) size is allocated.
"""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from fedcore.config import EarlyExitConfig, ModalityConfig, ModelConfig, SSLConfig
from fedcore.models.spec import (
    ARCHITECTURES,
    ModelSpec,
    audio_branch_spec,
    av_model_spec,
    build,
    classifier_spec,
    exit_model_spec,
    expected_entries,
    read_header,
    read_state,
    rebuild,
    spec_of,
    ssl_model_spec,
)

AUDIO = (1, 12, 16)
AV = av_model_spec(ModelConfig(name="cnn", width=2, depth=1), ModalityConfig(embed_dim=4, hidden_dim=4,
                                                                            visual_width=2, fusion="attention"),
                   AUDIO, (1, 8, 8), 3)
SPECS = {
    "classifier": classifier_spec(ModelConfig(name="cnn", width=2, depth=2), 3, AUDIO),
    "ssl_model": ssl_model_spec(ModelConfig(name="cnn", width=2, depth=1),
                                SSLConfig(method="byol", projector_dim=4, hidden_dim=8), AUDIO),
    "av_model": AV,
    "audio_branch": audio_branch_spec(AV),
    "early_exit": exit_model_spec(ModelConfig(name="transformer", width=8, depth=2),
                                  EarlyExitConfig(exits=[1, 2], head="mlp", tiers=[{"share": 1.0, "depth": 2}]),
                                  AUDIO, 3),
}


def _inputs(architecture: str) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(5)
    audio = torch.randn(3, *AUDIO, generator=g)
    return (audio, torch.rand(3, 1, 8, 8, generator=g)) if architecture == "av_model" else (audio,)


def _weights(model: torch.nn.Module) -> bytes:
    return safetensors.torch.save({k: v.detach().contiguous() for k, v in model.state_dict().items()})


def test_every_registered_architecture_has_a_case() -> None:
    assert sorted(SPECS) == ARCHITECTURES.names()


@pytest.mark.parametrize("architecture", sorted(SPECS))
def test_spec_and_weights_rebuild_the_same_model(architecture: str) -> None:
    spec = SPECS[architecture]
    model = build(spec, torch.Generator().manual_seed(11)).eval()
    again = ModelSpec.from_json(spec.to_json())
    assert again == spec
    rebuilt = rebuild(again, _weights(model))  # built from seed 0, then the weights are loaded
    assert spec_of(rebuilt) == spec
    assert not rebuilt.training
    assert rebuilt.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(rebuilt.state_dict()[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.equal(rebuilt(*_inputs(architecture)), model(*_inputs(architecture)))
    assert any(p.requires_grad for p in rebuilt.parameters())  # trainable (the distill stage's student)


def test_meta_build_lists_the_entries_without_memory() -> None:
    entries = expected_entries(SPECS["classifier"])
    model = build(SPECS["classifier"])
    names = {torch.float32: "F32", torch.int64: "I64"}
    assert {k: (v.dtype, v.shape) for k, v in entries.items()} == {
        k: (names[t.dtype], tuple(t.shape)) for k, t in model.state_dict().items()}
    huge = ModelSpec("classifier", {"model": {"name": "cnn", "width": 60000, "depth": 4}, "num_classes": 60000,
                                    "input_shape": [1, 64, 64]})
    assert sum(math_prod(e.shape) for e in expected_entries(huge).values()) > 10**10  # never allocated


def math_prod(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


# ------------------------------------------------------------------------------------------------ bad specs
def _spec_text(**changes: object) -> str:
    raw = SPECS["classifier"].to_dict()
    raw.update(changes)
    return json.dumps(raw)


@pytest.mark.parametrize(("text", "message"), [
    (_spec_text(architecture="evil_net"),
     "'architecture' must be one of audio_branch, av_model, classifier, early_exit, ssl_model. Got 'evil_net'"),
    (_spec_text(architecture="os.system"), "must be one of audio_branch"),
    (_spec_text(version=2), "'version' must be 1"),
    (_spec_text(options=[1, 2]), "'options' must be a mapping"),
    (json.dumps({"architecture": "classifier", "options": {}}), "keys must be"),
    ('{"version": 1, "architecture": "classifier", "architecture": "ssl_model", "options": {}}', "duplicate keys"),
    ('{"version": 1, "architecture": "classifier", "options": {"num_classes": NaN}}', "NaN is not a JSON number"),
    ("not json", "must be JSON"),
    ("[" * 50_000 + "]" * 50_000, "must be at most"),
    ('{"version": 1, "architecture": "classifier", "options": {"a": [[[[[[[[[[1]]]]]]]]]]}}', "nested at most"),
    ("\xff\xfe", "must be JSON"),
])
def test_bad_spec_text_is_refused(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=_escape(message)):
        ModelSpec.from_json(text)


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def _options(**changes: object) -> ModelSpec:
    return ModelSpec("classifier", {**SPECS["classifier"].options, **changes})


def _ssl_options(**changes: object) -> ModelSpec:
    """The ssl_model spec with its method_options changed (None: left out)."""
    method_options = {**SPECS["ssl_model"].options["method_options"], **changes}
    return ModelSpec("ssl_model", {**SPECS["ssl_model"].options,
                                   "method_options": {k: v for k, v in method_options.items() if v is not None}})


@pytest.mark.parametrize(("spec", "message"), [
    (_options(num_classes=10**9), "classifier: 'num_classes' must be an int in [1, 65536]. Got 1000000000."),
    (_options(num_classes=True), "'num_classes' must be an int"),
    (_options(num_classes=2.5), "'num_classes' must be an int"),
    (_options(input_shape=[1, 12]), "'input_shape' must be a list of 3 ints"),
    (_options(input_shape=[1, -4, 16]), "'input_shape[1]' must be an int"),
    (_options(model={"name": "evil", "width": 2, "depth": 1}), "'name' must be a registered model"),
    (_options(model={"name": "cnn", "width": 2, "depth": 100_000}), "'depth' must be an int in [1, 1024]"),
    (_options(model={"name": "cnn", "width": 2, "depth": 1, "code": "x"}), "unknown keys ['code']"),
    (_options(extra=1), "unknown options ['extra']"),
    (ModelSpec("classifier", {"model": {"name": "cnn"}}), "options ['input_shape', 'num_classes'] are missing"),
    (ModelSpec("av_model", {**AV.options, "fusion": "evil"}), "'fusion' must be a registered fusion"),
    (ModelSpec("av_model", {**AV.options, "dropout": 1.5}), "'dropout' must be a float in [0, 1)"),
    (ModelSpec("early_exit", {**SPECS["early_exit"].options, "exits": [1, 9]}), "'exits' must be increasing"),
    (ModelSpec("ssl_model", {**SPECS["ssl_model"].options, "method": "none"}), "must be a self-supervised method"),
    (ModelSpec("ssl_model", {**SPECS["ssl_model"].options, "method": "moco"}), "'method' must be a registered "
                                                                                 "ssl_method, one of acop, "),
    (ModelSpec("ssl_model", {**SPECS["ssl_model"].options, "method_options": [4, 8]}),
     "ssl_model: 'method_options' must be a mapping of byol's options. Got [4, 8]."),
    (_ssl_options(augment=[]), "ssl_model.method_options: unknown options ['augment']; allowed: ['hidden_dim', "
                               "'projector_dim', 'tau']."),
    (_ssl_options(temperature=0.5), "ssl_model.method_options: unknown options ['temperature']"),
    (_ssl_options(tau=None), "ssl_model.method_options: options ['tau'] are missing."),
    (_ssl_options(tau=1.5), "byol: 'tau' must be in [0, 1). Got 1.5."),
    (_ssl_options(tau="0.5"), "byol: 'tau' must be in [0, 1). Got '0.5'."),
    (_ssl_options(hidden_dim=10**9), "ssl_model.method_options: 'hidden_dim' must be an int in [1, 65536]."),
    (_ssl_options(projector_dim=2.0), "ssl_model.method_options: 'projector_dim' must be an int"),
])
def test_bad_options_are_refused_before_any_model_is_built(spec: ModelSpec, message: str) -> None:
    with pytest.raises(ValueError, match=_escape(message)):
        expected_entries(spec)


@pytest.mark.parametrize(("method", "own"), [
    ("simclr", {"temperature": 0.5}), ("barlow_twins", {"lambd": 0.25}),
    ("acop", {"clips": 2, "gap": 0.5, "span": "all"}), ("byol", {"tau": 0.9}),
])
def test_the_ssl_spec_holds_every_architecture_option_of_its_method(method: str, own: dict[str, object]) -> None:
    others = {"simclr": {"temperature": 0.3}, "byol": {"tau": 0.5}}  # never in another method's spec
    ssl = SSLConfig(method=method, projector_dim=4, hidden_dim=8, augment=[{"name": "gain"}],
                    options={**others, method: own})
    spec = ssl_model_spec(ModelConfig(name="cnn", width=2, depth=1), ssl, AUDIO)
    assert spec.options["method"] == method
    assert spec.options["method_options"] == {"projector_dim": 4, "hidden_dim": 8, **own}
    rebuilt = ModelSpec.from_json(spec.to_json())
    assert build(rebuilt, torch.Generator().manual_seed(0)).projector[-1].out_features == (2 if method == "acop"
                                                                                           else 4)


def test_the_ssl_spec_records_the_defaults_of_the_options_not_set() -> None:
    spec = ssl_model_spec(ModelConfig(name="cnn", width=2, depth=1), SSLConfig(method="acop"), AUDIO)
    assert spec.options["method_options"] == {"clips": 3, "gap": 0.2, "span": "valid", "projector_dim": 128,
                                              "hidden_dim": 256}


def test_a_spec_holding_a_non_json_value_is_refused() -> None:
    with pytest.raises(ValueError, match="must be a JSON value"):
        ModelSpec("classifier", {"model": object()})
    with pytest.raises(ValueError, match="must be a finite number"):
        ModelSpec("classifier", {"x": float("inf")})


# ------------------------------------------------------------------------------------------------ bad weights
@pytest.fixture()
def model() -> torch.nn.Module:
    return build(SPECS["classifier"], torch.Generator().manual_seed(3))


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def test_weights_of_another_shape_are_refused(model: torch.nn.Module) -> None:
    state = _state(model)
    state["classifier.weight"] = torch.zeros(5, state["classifier.weight"].shape[1])
    with pytest.raises(ValueError, match=r"1 entries of another shape or dtype \('classifier.weight': F32\[5, "):
        rebuild(SPECS["classifier"], safetensors.torch.save(state))


def test_weights_of_another_dtype_are_refused(model: torch.nn.Module) -> None:
    state = _state(model)
    state["classifier.bias"] = state["classifier.bias"].double()
    with pytest.raises(ValueError, match=r"'classifier.bias': F64\[3\], expected F32\[3\]"):
        rebuild(SPECS["classifier"], safetensors.torch.save(state))


def test_missing_and_unexpected_keys_are_refused(model: torch.nn.Module) -> None:
    state = _state(model)
    del state["classifier.bias"]
    state["payload"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['classifier.bias'\], unexpected keys \['payload'\]"):
        rebuild(SPECS["classifier"], safetensors.torch.save(state))


def test_truncated_weights_are_refused(model: torch.nn.Module) -> None:
    data = _weights(model)
    for cut in (len(data) - 1, len(data) // 2, 20, 3):
        with pytest.raises(ValueError, match="truncated"):
            rebuild(SPECS["classifier"], data[:cut])


def test_padded_or_garbled_weights_are_refused(model: torch.nn.Module) -> None:
    data = _weights(model)
    with pytest.raises(ValueError, match="padded"):
        read_header(data + b"\0" * 8)
    garbled = data[:8] + b"\xff" + data[9:]
    with pytest.raises(ValueError, match="header must be JSON"):
        read_header(garbled)
    with pytest.raises(ValueError, match="header length"):
        read_header((2**40).to_bytes(8, "little") + b"{}")


def test_overlapping_offsets_are_refused() -> None:
    header = json.dumps({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
                         "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    data = len(header).to_bytes(8, "little") + header + b"\0" * 8
    with pytest.raises(ValueError, match="must tile the data"):
        read_header(data)


def test_non_finite_weights_are_refused(model: torch.nn.Module) -> None:
    state = _state(model)
    state["classifier.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"every weight must be finite; \['classifier.weight'\] hold NaN or Inf"):
        rebuild(SPECS["classifier"], safetensors.torch.save(state))
    state = _state(model)
    state["classifier.bias"][1] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        read_state(safetensors.torch.save(state))


@pytest.mark.parametrize("architecture", sorted(SPECS))
def test_weights_of_another_architecture_are_refused(architecture: str) -> None:
    other = "classifier" if architecture != "classifier" else "ssl_model"
    weights = _weights(build(SPECS[other]))
    with pytest.raises(ValueError, match="must match the architecture of the spec exactly"):
        rebuild(SPECS[architecture], weights)


# ------------------------------------------------------------------------------------------------ early-exit norms
def _exit_spec(exit_norm: str) -> ModelSpec:
    return exit_model_spec(ModelConfig(name="transformer", width=8, depth=2),
                           EarlyExitConfig(exits=[1, 2], exit_norm=exit_norm,  # type: ignore[arg-type]
                                           tiers=[{"share": 1.0, "depth": 2}]), AUDIO, 3)


@pytest.mark.parametrize("exit_norm", ["per_exit", "shared"])
def test_the_exit_norm_is_in_the_early_exit_spec_and_rebuilds_the_same_model(exit_norm: str) -> None:
    spec = _exit_spec(exit_norm)
    assert spec.options["exit_norm"] == exit_norm
    model = build(spec, torch.Generator().manual_seed(3)).eval()
    again = ModelSpec.from_json(spec.to_json())
    assert again == spec and again.options["exit_norm"] == exit_norm
    rebuilt = rebuild(again, _weights(model))
    keys = set(rebuilt.state_dict())
    assert ({"exit_norms.1.weight", "exit_norms.2.bias"} <= keys) == (exit_norm == "per_exit")
    assert ("backbone.net.norm.weight" in keys) == (exit_norm == "shared")
    with torch.no_grad():
        assert torch.equal(rebuilt(*_inputs("early_exit")), model(*_inputs("early_exit")))
    other = _exit_spec("shared" if exit_norm == "per_exit" else "per_exit")
    with pytest.raises(ValueError, match="must match the architecture of the spec exactly"):
        rebuild(other, _weights(model))  # the option is part of the architecture


def test_an_early_exit_spec_without_exit_norm_predates_it_and_rebuilds_shared() -> None:
    legacy = ModelSpec("early_exit", {k: v for k, v in _exit_spec("shared").options.items() if k != "exit_norm"})
    model = build(_exit_spec("shared"), torch.Generator().manual_seed(3))
    rebuilt = rebuild(ModelSpec.from_json(legacy.to_json()), _weights(model))
    assert "backbone.net.norm.weight" in rebuilt.state_dict()


@pytest.mark.parametrize("value", ["layer", "PER_EXIT", "", 1, None, True, ["shared"]])
def test_an_invalid_exit_norm_in_a_spec_is_refused(value: object) -> None:
    spec = ModelSpec("early_exit", {**_exit_spec("per_exit").options, "exit_norm": value})
    with pytest.raises(ValueError, match=r"early_exit: 'exit_norm' must be one of per_exit, shared\. Got "):
        expected_entries(spec)


def test_an_invalid_exit_norm_in_params_is_refused() -> None:
    from fedcore.config import load_params
    from fedcore.errors import ConfigError

    assert load_params({}).earlyexit.exit_norm == "per_exit"
    with pytest.raises(ConfigError, match="earlyexit: 'exit_norm' must be one of 'per_exit', 'shared'. Got 'layer'"):
        load_params({"earlyexit": {"exit_norm": "layer"}})
