"""Damaged checkpoints and client stores: every kind of damage is reported, the resume falls back, nothing is lost.

A run of rounds 1..5 is written as the flows write it (client states, checkpoint, commit); then one file is
damaged (truncated, a bit flipped in the tensor bytes or in the header, a well-formed file with another shape or
dtype or NaN weights, a damaged or missing index, leftovers of an interrupted write) and the resume is checked:
its messages, the round it resumes from, and that every intact file is still on disk.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fedcore.errors import CheckpointError, ClientStateError
from fedcore.federation.checkpoint import Checkpointer, fingerprint
from fedcore.federation.client_store import ClientStore

FP = fingerprint({"run": "integrity"})
CLIENTS = (0, 1, 2)
ROUNDS = range(1, 6)
State = dict[str, torch.Tensor]


def _state(server_round: int) -> State:
    generator = torch.Generator().manual_seed(server_round)
    return {"conv.weight": torch.randn(4, 3, generator=generator),
            "bn.running_mean": torch.randn(4, generator=generator),
            "bn.num_batches_tracked": torch.tensor(server_round)}


REFERENCE = _state(0)


def _client_state(client: int, server_round: int) -> State:
    return {"personal/w": torch.full((3,), float(100 * client + server_round)), "optim/m": torch.ones(2) * client}


def _run(folder: Path, rounds: range = ROUNDS, sampled: Callable[[int], list[int]] = lambda r: list(CLIENTS),
         states: dict[int, State] | None = None) -> tuple[Checkpointer, ClientStore]:
    """Rounds as the flows run them: client states, then the checkpoint, then the store's commit."""
    ckpt, store = Checkpointer(folder, FP), ClientStore(folder / "clients")
    for r in rounds:
        for client in sampled(r):
            store.save(client, r, _client_state(client, r), {"round": str(r)})
        state = (states or {}).get(r, _state(r))
        ckpt.save(r, state, {"m_t": torch.full((2,), float(r))}, {"history": list(range(1, r + 1))})
        store.commit(r, sampled(r), oldest_kept=ckpt.kept_rounds()[0])
    return ckpt, store


def _resume(ckpt: Checkpointer, store: ClientStore | None = None) -> tuple[int, list[str]]:
    """Round resumed from (checked against what that round saved) and the messages reported."""
    messages: list[str] = []
    loaded = ckpt.load_latest(reference=REFERENCE, also_verify=None if store is None else store.verify,
                              report=messages.append)
    assert loaded is not None
    server_round, state, extra, meta = loaded
    assert all(torch.equal(state[k], v) for k, v in _state(server_round).items())
    assert torch.equal(extra["m_t"], torch.full((2,), float(server_round)))
    assert meta == {"history": list(range(1, server_round + 1))}
    return server_round, messages


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------------------------ damage
def _header_end(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def _flip(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def truncate_tail(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-5])


def truncate_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def empty(path: Path) -> None:
    path.write_bytes(b"")


def flip_payload(path: Path) -> None:
    _flip(path, _header_end(path.read_bytes()) + 5, bit=3)


def flip_header(path: Path) -> None:
    """One bit in the header that leaves valid JSON: a digit of a tensor's shape (e.g. 4 -> 5)."""
    match = re.compile(rb'"shape":\[(\d)').search(path.read_bytes(), 8)
    assert match is not None
    _flip(path, match.start(1))


DAMAGE = {
    "truncated-tail": (truncate_tail, "truncated"),
    "truncated-half": (truncate_half, "truncated"),
    "empty": (empty, "truncated"),
    "bit-in-payload": (flip_payload, "does not match the sha256 sealed in its header"),
    "bit-in-header": (flip_header, "does not match the sha256 sealed in its header"),
}

WELL_FORMED = {  # files that verify as files but hold a state that does not fit the model
    "wrong-shape": ({**_state(5), "conv.weight": torch.zeros(3, 4)},
                    "'conv.weight' has shape (3, 4), the model's is (4, 3)"),
    "wrong-dtype": ({**_state(5), "bn.running_mean": torch.zeros(4, dtype=torch.float64)},
                    "'bn.running_mean' has dtype torch.float64, the model's is torch.float32"),
    "nan-weights": ({**_state(5), "conv.weight": torch.full((4, 3), float("nan"))},
                    "'conv.weight' holds 12 non-finite values (NaN or inf)"),
    "missing-key": ({k: v for k, v in _state(5).items() if k != "bn.running_mean"},
                    "its keys differ from the model's: missing ['bn.running_mean'], unexpected []"),
}


# ------------------------------------------------------------------------------------------------ round files
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_latest_round_falls_back_to_the_older_one(tmp_path: Path, kind: str,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    ckpt, store = _run(tmp_path)
    damage, reason = DAMAGE[kind]
    damage(tmp_path / "round_0005.safetensors")
    before = _listing(tmp_path)
    with caplog.at_level(logging.WARNING, logger="fedcore.federation"):
        server_round, messages = _resume(ckpt, store)
    assert server_round == 4
    assert len(messages) == 2
    assert f"Checkpointer: {tmp_path}: round 5 (round_0005.safetensors) is not used: " in messages[0]
    assert "its sha256 differs from the one recorded in latest.json" in messages[0] and reason in messages[0]
    assert messages[0].endswith("Its files stay on disk.")
    assert messages[1] == (f"Checkpointer: {tmp_path}: resuming from round 4, the newest round whose checkpoint "
                           "verifies (1 newer round skipped).")
    assert [r.getMessage() for r in caplog.records if r.name == "fedcore.federation"] == messages
    assert _listing(tmp_path) == before  # nothing deleted, nothing changed by the load
    assert all(store.load(c, 4)[0]["personal/w"][0].item() == 100 * c + 4 for c in CLIENTS)  # type: ignore[index]


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_older_round_is_reported_and_the_latest_resumed(tmp_path: Path, kind: str) -> None:
    ckpt, store = _run(tmp_path)
    damage, reason = DAMAGE[kind]
    damage(tmp_path / "round_0004.safetensors")
    before = _listing(tmp_path)
    server_round, messages = _resume(ckpt, store)
    assert server_round == 5
    [message] = messages
    assert message.startswith(f"Checkpointer: {tmp_path}: the older checkpoint, round 4 (round_0004.safetensors), "
                              "does not verify: its sha256 differs from the one recorded in latest.json")
    assert reason in message and "a later resume cannot fall back to round 4" in message
    assert _listing(tmp_path) == before


@pytest.mark.parametrize("kind", list(WELL_FORMED))
def test_well_formed_round_that_does_not_fit_the_model_falls_back(tmp_path: Path, kind: str) -> None:
    bad, reason = WELL_FORMED[kind]
    ckpt, store = _run(tmp_path, states={5: bad})
    assert ckpt.load_latest() is not None  # a file that verifies: only the reference tells
    server_round, messages = _resume(ckpt, store)
    assert server_round == 4
    assert messages[0].endswith(f"round 5 (round_0005.safetensors) is not used: its global state does not fit the "
                                f"model: {reason}. Its files stay on disk.")
    assert "resuming from round 4" in messages[1]
    assert (tmp_path / "round_0005.safetensors").is_file()


@pytest.mark.parametrize("kind", list(WELL_FORMED))
def test_well_formed_older_round_that_does_not_fit_is_reported(tmp_path: Path, kind: str) -> None:
    bad, reason = WELL_FORMED[kind]
    ckpt, store = _run(tmp_path, states={4: bad})
    server_round, [message] = _resume(ckpt, store)
    assert server_round == 5
    assert f"the older checkpoint, round 4 (round_0004.safetensors), does not verify: its global state does not " \
           f"fit the model: {reason}." in message


def test_every_single_bit_flip_in_the_latest_round_file_is_caught(tmp_path: Path) -> None:
    """No flipped bit anywhere in the file (length prefix, header, padding, tensors) is resumed."""
    ckpt, _ = _run(tmp_path, rounds=range(4, 6))
    path = tmp_path / "round_0005.safetensors"
    original = path.read_bytes()
    for offset in range(len(original)):
        _flip(path, offset, bit=offset % 8)
        for index_present in (True, False):  # checked against latest.json's sha256, and by its own seal alone
            if not index_present:
                (tmp_path / "latest.json").rename(tmp_path / "index.bak")
            messages: list[str] = []
            loaded = ckpt.load_latest(reference=REFERENCE, report=messages.append)
            assert loaded is not None and loaded[0] == 4, (offset, index_present, messages)
            assert "round 5 (round_0005.safetensors) is not used" in "\n".join(messages)
            if not index_present:
                (tmp_path / "index.bak").rename(tmp_path / "latest.json")
        path.write_bytes(original)
    assert ckpt.load_latest() is not None and ckpt.load_latest()[0] == 5  # type: ignore[index]


def test_round_file_replaced_by_another_sealed_one_is_caught_by_the_index(tmp_path: Path) -> None:
    ckpt, _ = _run(tmp_path, rounds=range(4, 6))
    other, _ = _run(tmp_path / "other", rounds=range(5, 6), states={5: _state(99)})
    (tmp_path / "round_0005.safetensors").write_bytes((tmp_path / "other" / "round_0005.safetensors").read_bytes())
    server_round, messages = _resume(ckpt)
    assert server_round == 4
    assert "its sha256 differs from the one recorded in latest.json: its header's seal still matches, so the " \
           "file was replaced by another one" in messages[0]


# ------------------------------------------------------------------------------------------------ index
def _flip_index_fingerprint(path: Path) -> None:
    """One bit of latest.json that leaves valid JSON naming another fingerprint."""
    text = path.read_bytes()
    at = text.index(FP.encode()) + 3
    _flip(path, at, bit=1 if text[at : at + 1] in b"0145" else 0)
    assert json.loads(path.read_bytes())["fingerprint"] != FP


INDEX_DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing": (lambda p: p.unlink(), "latest.json is missing"),
    "not-json": (lambda p: p.write_text("{not json"), "latest.json is damaged (it is not valid JSON"),
    "truncated": (truncate_half, "latest.json is damaged (it is not valid JSON"),
    "empty": (empty, "latest.json is damaged (it is not valid JSON"),
    "bit-in-fingerprint": (_flip_index_fingerprint,
                           "latest.json is damaged (its content does not match its own sha256"),
    "bit-in-meta": (lambda p: _flip(p, p.read_bytes().index(b'"history"') + 1, bit=5),
                    "latest.json is damaged (its content does not match its own sha256"),
    "json-list": (lambda p: p.write_text("[1, 2]"), "latest.json is damaged (it holds a JSON list, not an object)"),
}


@pytest.mark.parametrize("kind", list(INDEX_DAMAGE))
def test_damaged_or_missing_index_resumes_from_the_round_files_headers(tmp_path: Path, kind: str) -> None:
    ckpt, store = _run(tmp_path)
    damage, reason = INDEX_DAMAGE[kind]
    damage(tmp_path / "latest.json")
    rounds_before = {p.name: p.read_bytes() for p in tmp_path.glob("round_*")}
    server_round, messages = _resume(ckpt, store)
    assert server_round == 5  # the history comes from round 5's own header
    [message] = messages
    assert message.startswith(f"Checkpointer: {tmp_path}: {reason}")
    assert message.endswith("each round file is checked against the checksum in its own header instead.")
    assert {p.name: p.read_bytes() for p in tmp_path.glob("round_*")} == rounds_before  # a flipped fingerprint
    # bit in latest.json does not clear the run's checkpoints
    ckpt.save(6, _state(6), {"m_t": torch.full((2,), 6.0)}, {"history": list(range(1, 7))})  # rebuilds the index
    assert _resume(ckpt) == (6, [])
    assert ckpt.kept_rounds() == [5, 6]


@pytest.mark.parametrize("kind", ["missing", "not-json", "bit-in-fingerprint"])
def test_damaged_index_and_damaged_latest_round_fall_back_by_headers(tmp_path: Path, kind: str) -> None:
    ckpt, store = _run(tmp_path)
    INDEX_DAMAGE[kind][0](tmp_path / "latest.json")
    flip_payload(tmp_path / "round_0005.safetensors")
    server_round, messages = _resume(ckpt, store)
    assert server_round == 4
    assert "round 5 (round_0005.safetensors) is not used: its content does not match the sha256 sealed in its " \
           "header" in messages[1]
    assert (tmp_path / "round_0005.safetensors").is_file()


def test_index_listing_missing_files_is_an_error_naming_the_fix(tmp_path: Path) -> None:
    ckpt, _ = _run(tmp_path)
    for path in tmp_path.glob("round_*"):
        path.unlink()
    with pytest.raises(CheckpointError) as info:
        ckpt.load_latest()
    assert "round 5 (round_0005.safetensors) is not used: latest.json lists it, but its file is missing" \
        in str(info.value)
    assert (tmp_path / "latest.json").is_file()


# ------------------------------------------------------------------------------------------------ leftovers
def test_leftover_tmp_files_are_reported_ignored_and_removed_by_the_next_save(tmp_path: Path) -> None:
    ckpt, store = _run(tmp_path)
    (tmp_path / "round_0006.safetensors.tmp").write_bytes(b"\x10\x00\x00partial")
    (tmp_path / "latest.json.tmp").write_text('{"fingerprint": "abc", "rou')
    server_round, messages = _resume(ckpt, store)
    assert server_round == 5
    assert messages == [
        f"Checkpointer: {tmp_path}: ignored 'latest.json.tmp', left by an interrupted write (the next save removes "
        "it).",
        f"Checkpointer: {tmp_path}: ignored 'round_0006.safetensors.tmp', left by an interrupted write (the next "
        "save removes it).",
    ]
    assert (tmp_path / "round_0006.safetensors.tmp").exists()  # a load deletes nothing
    ckpt.save(6, _state(6), {"m_t": torch.full((2,), 6.0)}, {"history": list(range(1, 7))})
    assert not list(tmp_path.glob("*.tmp"))


def test_round_written_before_the_index_was_updated_is_resumed(tmp_path: Path) -> None:
    """A kill between the round file's rename and latest.json's: the complete round file verifies by its seal."""
    ckpt, _ = _run(tmp_path)
    index = (tmp_path / "latest.json").read_bytes()
    ckpt.save(6, _state(6), {"m_t": torch.full((2,), 6.0)}, {"history": list(range(1, 7))})
    (tmp_path / "round_0004.safetensors").write_bytes(b"")  # what save(6) pruned, as if it had not run yet
    (tmp_path / "latest.json").write_bytes(index)
    assert _resume(ckpt)[0] == 6


# ------------------------------------------------------------------------------------------------ none verifies
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_no_verified_round_raises_naming_the_folder_and_the_fix(tmp_path: Path, kind: str) -> None:
    ckpt, store = _run(tmp_path)
    for r in (4, 5):
        DAMAGE[kind][0](tmp_path / f"round_000{r}.safetensors")
    before = _listing(tmp_path)
    with pytest.raises(CheckpointError) as info:
        ckpt.load_latest(reference=REFERENCE, also_verify=store.verify)
    message = str(info.value)
    assert message.startswith(f"Checkpointer: no checkpoint in {tmp_path} verifies, so the run cannot resume:\n"
                              "  - round 5 (round_0005.safetensors) is not used: ")
    assert "\n  - round 4 (round_0004.safetensors) is not used: " in message
    assert message.endswith(f"Fix: restore the damaged files (e.g. from a backup) and run again, or delete the "
                            f"folder {tmp_path} (with its client states) to start the run over from round 0.")
    assert _listing(tmp_path) == before


def test_only_unsealed_round_files_without_index_raise(tmp_path: Path) -> None:
    safetensors.torch.save_file({"state/w": torch.zeros(2)}, tmp_path / "round_0003.safetensors",
                                metadata={"fingerprint": FP, "round": "3"})
    with pytest.raises(CheckpointError, match=r"round 3 \(round_0003\.safetensors\) is not used: it has no seal"):
        Checkpointer(tmp_path, FP).load_latest()


# ------------------------------------------------------------------------------------------------ other runs
def test_other_fingerprint_is_cleared_and_reported(tmp_path: Path) -> None:
    _run(tmp_path)
    (tmp_path / "notes.txt").write_text("not ours")
    messages: list[str] = []
    assert Checkpointer(tmp_path, "another").load_latest(report=messages.append) is None
    [message] = messages
    assert message == (f"Checkpointer: {tmp_path}: the checkpoints were written by another run configuration "
                       f"(fingerprint {FP[:12]}..., this run's another...); cleared them, the run starts from "
                       "round 0.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clients", "notes.txt"]  # the store is the flow's to reset


def test_other_fingerprint_without_index_is_cleared_and_reported(tmp_path: Path) -> None:
    _run(tmp_path)
    (tmp_path / "latest.json").unlink()
    messages: list[str] = []
    assert Checkpointer(tmp_path, "another").load_latest(report=messages.append) is None
    assert "round 5 (round_0005.safetensors) is not used: it belongs to another run configuration" in messages[1]
    assert messages[-1].endswith("the checkpoints were written by another run configuration; cleared them, the "
                                 "run starts from round 0.")
    assert not list(tmp_path.glob("round_*"))


def test_checkpoints_of_an_older_fedcore_resume_with_a_warning(tmp_path: Path) -> None:
    """latest.json and round files as written before checksums: the newest round resumes, unverified."""
    state = {f"state/{k}": v for k, v in _state(3).items()} | {"extra/m_t": torch.full((2,), 3.0)}
    for r in (2, 3):
        safetensors.torch.save_file(state, tmp_path / f"round_000{r}.safetensors",
                                    metadata={"fingerprint": FP, "round": str(r)})
    (tmp_path / "latest.json").write_text(json.dumps({"fingerprint": FP, "round": 3, "file": "round_0003.safetensors",
                                                      "meta": {"history": [1, 2, 3]}}))
    ckpt = Checkpointer(tmp_path, FP)
    server_round, messages = _resume(ckpt)
    assert server_round == 3
    assert messages == [f"Checkpointer: {tmp_path}: round 3 was written by an older fedcore without checksums; it "
                        "is resumed unverified (the next save adds checksums)."]
    ckpt.save(4, _state(4), {"m_t": torch.full((2,), 4.0)}, {"history": [1, 2, 3, 4]})
    assert _resume(ckpt) == (4, [])
    assert ckpt.kept_rounds() == [4]  # the unsealed round 3 cannot be verified, so it is not kept as a fallback


# ------------------------------------------------------------------------------------------------ client store
@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_client_file_of_the_latest_round_falls_back_with_every_clients_state(tmp_path: Path,
                                                                                    kind: str) -> None:
    ckpt, store = _run(tmp_path)
    damage, reason = DAMAGE[kind]
    bad = store.client_folder(1) / "round_0005.safetensors"
    damage(bad)
    before = _listing(tmp_path)
    server_round, messages = _resume(ckpt, store)
    assert server_round == 4
    assert messages[0].startswith(f"Checkpointer: {tmp_path}: round 5 (round_0005.safetensors) is not used: the "
                                  f"state it needs besides its file does not verify: client 1's state {str(bad)!r} "
                                  f"(round 5) is damaged: ")
    assert reason in messages[0]
    assert "resuming from round 4" in messages[1]
    assert _listing(tmp_path) == before
    for client in CLIENTS:  # what the resumed round 4 reads
        tensors, meta = store.load(client, 4)  # type: ignore[misc]
        assert meta == {"round": "4"} and torch.equal(tensors["personal/w"], _client_state(client, 4)["personal/w"])
    # the flow's resume: drop what came after round 4, redo round 5; the next resume is clean
    store.rollback(4)
    _run(tmp_path, rounds=range(5, 6))
    assert _resume(ckpt, store) == (5, [])


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_damaged_client_file_met_during_a_run_names_client_file_and_round(tmp_path: Path, kind: str) -> None:
    _, store = _run(tmp_path)
    bad = store.client_folder(2) / "round_0005.safetensors"
    DAMAGE[kind][0](bad)
    with pytest.raises(ClientStateError) as info:
        store.load(2, 5)
    error = info.value
    assert (error.client, error.path, error.server_round) == (2, str(bad), 5)
    assert str(error).startswith(f"ClientStore.load: {str(bad)!r} (client 2, round 5) is not a valid client-state "
                                 f"file: {error.reason}. Fix: ")
    assert DAMAGE[kind][1] in error.reason
    copy = pickle.loads(pickle.dumps(error))  # crosses process-pool boundaries intact
    assert (type(copy), str(copy), copy.client, copy.path, copy.server_round) == \
        (ClientStateError, str(error), 2, str(bad), 5)
    assert isinstance(error, CheckpointError) and isinstance(error, ValueError)


def test_damaged_older_client_file_not_read_by_the_latest_round_does_not_block_it(tmp_path: Path) -> None:
    ckpt, store = _run(tmp_path)
    flip_payload(store.client_folder(1) / "round_0004.safetensors")
    assert _resume(ckpt, store) == (5, [])  # round 5 reads client 1's round-5 state
    assert "client 1's state" in store.verify(4)[0]


def test_damaged_client_file_needed_by_every_kept_round_raises(tmp_path: Path) -> None:
    """Client 2 last trained in round 3: both kept checkpoints (4 and 5) need that one file."""
    ckpt, store = _run(tmp_path, sampled=lambda r: [0, 1, 2] if r <= 3 else [0, 1])
    bad = store.client_folder(2) / "round_0003.safetensors"
    assert store.rounds(2) == [2, 3]  # committed last in round 3, keeping its state as of round 2 too
    flip_header(bad)
    with pytest.raises(CheckpointError) as info:
        ckpt.load_latest(reference=REFERENCE, also_verify=store.verify)
    message = str(info.value)
    assert message.count(f"client 2's state {str(bad)!r} (round 3) is damaged") == 2
    assert "Fix: restore the damaged files" in message
    assert bad.is_file()


def test_client_files_of_an_older_fedcore_load_and_verify(tmp_path: Path) -> None:
    store = ClientStore(tmp_path)
    path = store.client_folder(4) / "round_0002.safetensors"
    path.parent.mkdir()
    safetensors.torch.save_file({"w": torch.ones(2)}, path, metadata={"round": "2"})
    assert store.verify(2) == []
    tensors, meta = store.load(4, 2)  # type: ignore[misc]
    assert meta == {"round": "2"} and torch.equal(tensors["w"], torch.ones(2))


def test_every_single_bit_flip_in_a_client_file_is_caught(tmp_path: Path) -> None:
    store = ClientStore(tmp_path)
    path = store.save(3, 1, _client_state(3, 1), {"round": "1"})
    original = path.read_bytes()
    for offset in range(len(original)):
        _flip(path, offset, bit=(offset * 5) % 8)
        with pytest.raises(ClientStateError):
            store.load(3, 1)
        assert len(store.verify(1)) == 1, offset
        path.write_bytes(original)
    assert store.verify(1) == [] and store.load(3, 1) is not None


# ------------------------------------------------------------------------------------------------ property
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    sampled=st.lists(st.lists(st.sampled_from(range(4)), unique=True), min_size=5, max_size=5),
    kind=st.sampled_from(sorted(DAMAGE)),
    target=st.sampled_from(["checkpoint", "client"]),
)
def test_damaged_newest_round_falls_back_to_4_with_every_clients_round_4_state(
    tmp_path_factory: pytest.TempPathFactory, sampled: list[list[int]], kind: str, target: str
) -> None:
    folder = tmp_path_factory.mktemp("run")
    ckpt, store = _run(folder, sampled=lambda r: sorted(sampled[r - 1]))
    if target == "client" and sampled[4]:
        DAMAGE[kind][0](store.client_folder(min(sampled[4])) / "round_0005.safetensors")
    else:
        DAMAGE[kind][0](folder / "round_0005.safetensors")
    assert _resume(ckpt, store)[0] == 4
    store.rollback(4)
    for client in range(4):  # the state each client had after round 4: its newest round <= 4, if any
        trained = [r for r in range(1, 5) if client in sampled[r - 1]]
        loaded = store.load(client, 4)
        if not trained:
            assert loaded is None
        else:
            assert loaded is not None and loaded[1] == {"round": str(trained[-1])}
            assert torch.equal(loaded[0]["personal/w"], _client_state(client, trained[-1])["personal/w"])
