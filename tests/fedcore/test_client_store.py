"""Per-client state store: versions per round, commit / rollback / reset, safe loading, validation."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path
from typing import Any

import pytest
import torch

from fedcore.errors import ClientStateError
from fedcore.federation.client_store import ClientStore


def _state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {"personal/conv.weight": torch.randn(3, 2, generator=generator),
            "optim/conv.weight": torch.randn(3, 2, generator=generator)}


def _version(store: ClientStore, client: int, upto_round: int) -> str | None:
    """The ``written`` metadata of the version ``load`` picks (None when there is none)."""
    loaded = store.load(client, upto_round)
    return None if loaded is None else loaded[1]["written"]


def _save_rounds(store: ClientStore, client: int, rounds: list[int]) -> None:
    for r in rounds:
        store.save(client, r, _state(100 * client + r), {"written": str(r)})


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """Integer view of a tensor's bytes, so NaN payloads and signed zeros are compared exactly."""
    return tensor.reshape(-1).contiguous().view(torch.uint8)


# ------------------------------------------------------------------------------------------------ round trip
def test_round_trip_is_bit_exact(tmp_path: Path) -> None:
    store = ClientStore(tmp_path / "clients")
    weight = torch.randn(4, 5)
    weight[0, 0], weight[0, 1], weight[0, 2] = float("nan"), float("-inf"), -0.0
    tensors = {
        "personal/conv.weight": weight,
        "personal/conv.weight_t": weight.t(),  # non-contiguous view
        "personal/bn.running_mean": torch.randn(5, dtype=torch.float64),
        "personal/bn.num_batches_tracked": torch.tensor(17, dtype=torch.int64),  # 0-dim int64
        "optim/step": torch.arange(-3, 3, dtype=torch.int64),
        "optim/half": torch.randn(3).to(torch.bfloat16),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
    }
    metadata = {"written": "7", "algorithm": "fedper", "note": "ünïcode / \"quotes\""}
    path = store.save(3, 7, tensors, metadata)
    assert path == tmp_path / "clients" / "000003" / "round_0007.safetensors"
    assert path.is_file()

    loaded = store.load(3, 7)
    assert loaded is not None
    out, meta = loaded
    assert meta == metadata
    assert set(out) == set(tensors)
    for key, tensor in tensors.items():
        assert out[key].dtype == tensor.dtype, key
        assert out[key].shape == tensor.shape, key
        assert out[key].device.type == "cpu", key
        assert torch.equal(_bits(out[key]), _bits(tensor)), key
    assert out["personal/bn.num_batches_tracked"].dim() == 0
    assert out["personal/bn.num_batches_tracked"].item() == 17


def test_save_copies_and_loaded_tensors_own_their_memory(tmp_path: Path) -> None:
    store = ClientStore(tmp_path)
    original = torch.ones(3)
    store.save(0, 1, {"w": original})
    original.add_(5)  # changing the caller's tensor after the save must not change the file
    first = store.load(0, 1)
    assert first is not None
    assert torch.equal(first[0]["w"], torch.ones(3))
    first[0]["w"].add_(1)  # writable, and independent of the file
    second = store.load(0, 1)
    assert second is not None
    assert torch.equal(second[0]["w"], torch.ones(3))


def test_empty_state_and_no_metadata(tmp_path: Path) -> None:
    store = ClientStore(tmp_path)
    store.save(1, 0, {})
    assert store.load(1, 0) == ({}, {})
    assert store.rounds(1) == [0]


def test_saving_the_same_round_again_replaces_it(tmp_path: Path) -> None:
    store = ClientStore(tmp_path)
    store.save(2, 4, {"w": torch.zeros(2)}, {"written": "first"})
    store.save(2, 4, {"w": torch.ones(2)}, {"written": "second"})
    loaded = store.load(2, 4)
    assert loaded is not None
    assert loaded[1] == {"written": "second"} and torch.equal(loaded[0]["w"], torch.ones(2))
    assert store.rounds(2) == [4]
    assert sorted(p.name for p in (tmp_path / "000002").iterdir()) == ["round_0004.safetensors"]


def test_large_ids_and_rounds_keep_working(tmp_path: Path) -> None:
    store = ClientStore(tmp_path)
    store.save(1_234_567, 12_345, {"w": torch.zeros(1)}, {"written": "12345"})
    assert (tmp_path / "1234567" / "round_12345.safetensors").is_file()
    assert store.rounds(1_234_567) == [12_345]
    assert store.clients() == [1_234_567]
    assert _version(store, 1_234_567, 20_000) == "12345"


# ------------------------------------------------------------------------------------------------ versions
def test_load_returns_newest_version_up_to_round(tmp_path: Path) -> None:
    store = ClientStore(tmp_path)
    _save_rounds(store, 5, [1, 3, 5])
    assert store.rounds(5) == [1, 3, 5]
    assert _version(store, 5, 0) is None
    assert _version(store, 5, 1) == "1"
    assert _version(store, 5, 2) == "1"
    assert _version(store, 5, 3) == "3"
    assert _version(store, 5, 4) == "3"
    assert _version(store, 5, 5) == "5"
    assert _version(store, 5, 99) == "5"
    loaded = store.load(5, 4)
    assert loaded is not None
    assert torch.equal(loaded[0]["personal/conv.weight"], _state(503)["personal/conv.weight"])


def test_unknown_client_has_nothing(tmp_path: Path) -> None:
    store = ClientStore(tmp_path / "missing")
    assert store.load(0, 10) is None
    assert store.rounds(0) == []
    assert store.clients() == []
    assert store.nbytes() == 0
    assert store.rollback(0) == 0
    store.commit(3, [0, 1])
    store.reset()
    assert not (tmp_path / "missing").exists()  # nothing but save creates folders


def test_load_lists_only_the_clients_own_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ClientStore(tmp_path)
    for client in range(5):
        _save_rounds(store, client, [1, 2])
    listed: list[Path] = []
    real_scandir, real_listdir = os.scandir, os.listdir

    def scandir(path: Any = ".") -> Any:
        listed.append(Path(path))
        return real_scandir(path)

    def listdir(path: Any = ".") -> Any:
        listed.append(Path(path))
        return real_listdir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(os, "listdir", listdir)
    assert _version(store, 3, 2) == "2"
    assert listed and set(listed) == {tmp_path / "000003"}


def test_clients_and_nbytes(tmp_path: Path) -> None:
    store = ClientStore(tmp_path)
    _save_rounds(store, 10, [1, 2])
    _save_rounds(store, 2, [1])
    (tmp_path / "000004").mkdir()  # a client folder without versions
    (tmp_path / "000004" / "round_0001.safetensors.tmp").write_bytes(b"partial")
    assert store.clients() == [2, 10]
    files = list(tmp_path.glob("*/round_*.safetensors"))
    assert len(files) == 3
    assert store.nbytes() == sum(p.stat().st_size for p in files) > 0


# ------------------------------------------------------------------------------------------------ resume safety
def test_rollback_after_kill_between_client_save_and_checkpoint(tmp_path: Path) -> None:
    store = ClientStore(tmp_path)
    # rounds 1 and 2 completed (client states, then checkpoint, then commit)
    for r in (1, 2):
        _save_rounds(store, 0, [r])
        _save_rounds(store, 1, [r])
        store.commit(r, [0, 1])
    # round 3: client states written, then the run is killed before the round-3 checkpoint
    _save_rounds(store, 0, [3])
    _save_rounds(store, 1, [3])
    _save_rounds(store, 7, [3])  # first seen in round 3: its folder must go entirely
    assert _version(store, 0, 3) == "3"

    # resume from the round-2 checkpoint (round 1's versions stay: the checkpointer keeps rounds 1 and 2)
    assert store.rollback(2) == 3
    assert store.rounds(0) == [1, 2] and store.rounds(1) == [1, 2]
    assert _version(store, 0, 3) == "2" and _version(store, 1, 99) == "2"
    assert store.load(7, 3) is None
    assert store.clients() == [0, 1]
    assert not (tmp_path / "000007").exists()
    assert store.rollback(2) == 0


def test_rollback_removes_tmp_leftovers_and_keeps_foreign_files(tmp_path: Path) -> None:
    store = ClientStore(tmp_path)
    _save_rounds(store, 0, [1])
    (tmp_path / "000000" / "round_0002.safetensors.tmp").write_bytes(b"partial")
    (tmp_path / "000009").mkdir()
    (tmp_path / "000009" / "round_0004.safetensors.tmp").write_bytes(b"partial")
    (tmp_path / "000009" / "notes.txt").write_text("keep me")
    assert store.rollback(1) == 2
    assert store.rounds(0) == [1]
    assert not list(tmp_path.glob("*/*.tmp"))
    assert (tmp_path / "000009" / "notes.txt").read_text() == "keep me"  # folder not empty: kept


def test_commit_keeps_newest_up_to_round_for_listed_clients_only(tmp_path: Path) -> None:
    store = ClientStore(tmp_path)
    _save_rounds(store, 1, [1, 2, 3, 5])
    _save_rounds(store, 2, [1, 2, 3, 5])
    _save_rounds(store, 3, [4])  # only a version newer than the committed round
    (tmp_path / "000001" / "round_0006.safetensors.tmp").write_bytes(b"partial")
    (tmp_path / "000002" / "round_0006.safetensors.tmp").write_bytes(b"partial")

    store.commit(3, iter([1, 3, 1, 42]), oldest_kept=3)  # any iterable; duplicates, clients without folders
    assert store.rounds(1) == [3, 5]
    assert store.rounds(2) == [1, 2, 3, 5]
    assert store.rounds(3) == [4]
    assert not (tmp_path / "000001" / "round_0006.safetensors.tmp").exists()
    assert (tmp_path / "000002" / "round_0006.safetensors.tmp").exists()  # client 2 was not listed
    assert _version(store, 1, 3) == "3" and _version(store, 1, 5) == "5"
    assert not (tmp_path / "000042").exists()


@pytest.mark.parametrize(("oldest_kept", "kept"), [(None, [2, 3, 5]), (2, [2, 3, 5]), (1, [1, 2, 3, 5]),
                                                   (0, [1, 2, 3, 5]), (3, [3, 5])])
def test_commit_keeps_each_clients_state_as_of_the_oldest_kept_checkpoint(
    tmp_path: Path, oldest_kept: int | None, kept: list[int]
) -> None:
    store = ClientStore(tmp_path)
    _save_rounds(store, 1, [1, 2, 3, 5])
    store.commit(3, [1], oldest_kept=oldest_kept)  # default: server_round - 1, as Checkpointer(keep=2) keeps
    assert store.rounds(1) == kept
    for resume_round in range(oldest_kept if oldest_kept is not None else 2, 4):  # every kept checkpoint round
        expected = max((r for r in [1, 2, 3, 5] if r <= resume_round), default=None)
        assert _version(store, 1, resume_round) == (None if expected is None else str(expected))


def test_commit_rejects_oldest_kept_above_server_round(tmp_path: Path) -> None:
    store = ClientStore(tmp_path)
    _save_rounds(store, 1, [1, 2])
    with pytest.raises(ValueError, match=re.escape("ClientStore.commit: 'oldest_kept' must be <= 'server_round' "
                                                   "(2). Got 3.")):
        store.commit(2, [1], oldest_kept=3)
    with pytest.raises(ValueError, match=re.escape("ClientStore.commit: 'oldest_kept' must be an int >= 0. "
                                                   "Got -1.")):
        store.commit(2, [1], oldest_kept=-1)
    assert store.rounds(1) == [1, 2]


def test_tmp_leftover_is_never_loaded(tmp_path: Path) -> None:
    store = ClientStore(tmp_path)
    _save_rounds(store, 4, [1])
    leftover = tmp_path / "000004" / "round_0002.safetensors.tmp"
    leftover.write_bytes(b"\x10\x00\x00partial")
    assert store.rounds(4) == [1]
    assert _version(store, 4, 2) == "1"
    assert store.verify(2) == []
    store.commit(2, [4])
    assert not leftover.exists()
    assert store.rounds(4) == [1]


def test_non_canonical_names_are_not_versions(tmp_path: Path) -> None:
    store = ClientStore(tmp_path)
    _save_rounds(store, 1, [1])
    folder = tmp_path / "000001"
    for name in ("round_00002.safetensors", "round_3.safetensors", "round_0004.safetensors.bak", "x.safetensors"):
        (folder / name).write_bytes(b"not a version")
    assert store.rounds(1) == [1]
    assert _version(store, 1, 10) == "1"


# ------------------------------------------------------------------------------------------------ reset
def test_reset_removes_only_store_files(tmp_path: Path) -> None:
    store = ClientStore(tmp_path)
    _save_rounds(store, 0, [1, 2])
    _save_rounds(store, 12, [3])
    (tmp_path / "000012" / "round_0004.safetensors.tmp").write_bytes(b"partial")
    (tmp_path / "000012" / "readme.txt").write_text("mine")
    unrelated = {
        tmp_path / "notes.txt": "top",
        tmp_path / "12345" / "round_0001.safetensors": "five digits: not a client folder",
        tmp_path / "0000123" / "round_0001.safetensors": "not canonical: would be 000123",
        tmp_path / "other" / "round_0001.safetensors": "not a client folder",
    }
    for path, text in unrelated.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    store.reset()
    assert store.clients() == [] and store.nbytes() == 0
    assert not (tmp_path / "000000").exists()
    assert sorted(p.name for p in (tmp_path / "000012").iterdir()) == ["readme.txt"]
    for path, text in unrelated.items():
        assert path.read_text() == text
    assert tmp_path.is_dir()


# ------------------------------------------------------------------------------------------------ safe loading
class _Payload:
    """Unpickling this creates ``marker`` (stands in for arbitrary code run by pickle)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def test_pickle_with_a_version_name_is_rejected_without_running_it(tmp_path: Path) -> None:
    store = ClientStore(tmp_path / "store")
    marker = tmp_path / "marker"
    data = pickle.dumps({"w": _Payload(marker)})
    path = tmp_path / "store" / "000005" / "round_0001.safetensors"
    path.parent.mkdir(parents=True)
    path.write_bytes(data)

    with pytest.raises(ClientStateError, match=r"ClientStore\.load: .*round_0001\.safetensors.*client 5, round 1"):
        store.load(5, 1)
    assert not marker.exists()
    # the payload is live: unpickling it does run code, so the check above could fail
    pickle.loads(data)
    assert marker.is_dir()


@pytest.mark.parametrize(
    "content",
    [b"", b"short", b"\x08\x00\x00\x00\x00\x00\x00\x00[1,2,3]", b"\xff" * 64, "torch"],
    ids=["empty", "short", "json-list-header", "garbage", "torch-save"],
)
def test_invalid_file_raises_clear_error(tmp_path: Path, content: bytes | str) -> None:
    store = ClientStore(tmp_path)
    path = tmp_path / "000000" / "round_0002.safetensors"
    path.parent.mkdir()
    if content == "torch":
        torch.save({"w": torch.zeros(2)}, path)
    else:
        assert isinstance(content, bytes)
        path.write_bytes(content)
    assert store.rounds(0) == [2]
    with pytest.raises(ValueError, match=r"ClientStore\.load: .*000000.*round_0002\.safetensors.* is not a valid"):
        store.load(0, 2)
    assert store.load(0, 1) is None  # an older bound does not touch the bad file
    [problem] = store.verify(2)
    assert problem.startswith("client 0's state ") and "round_0002.safetensors' (round 2) is damaged: " in problem
    assert store.verify(1) == []


# ------------------------------------------------------------------------------------------------ pickling
def test_store_pickles_and_holds_no_per_client_state(tmp_path: Path) -> None:
    store = ClientStore(tmp_path)
    size_before = len(pickle.dumps(store))
    for client in range(50):
        store.save(client, 1, {"w": torch.full((2,), float(client))})
        assert store.load(client, 1) is not None
    assert len(pickle.dumps(store)) == size_before  # nothing cached per client
    assert not hasattr(store, "__dict__")

    copy = pickle.loads(pickle.dumps(store))
    assert isinstance(copy, ClientStore) and copy.folder == store.folder
    loaded = copy.load(17, 1)
    assert loaded is not None and torch.equal(loaded[0]["w"], torch.full((2,), 17.0))
    copy.save(99, 2, {"w": torch.zeros(1)})
    assert store.rounds(99) == [2]


# ------------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize("bad", [-1, True, 1.0, "1", None])
@pytest.mark.parametrize(
    ("where", "name", "call"),
    [
        ("save", "client", lambda s, v: s.save(v, 1, {})),
        ("save", "server_round", lambda s, v: s.save(1, v, {})),
        ("load", "client", lambda s, v: s.load(v, 1)),
        ("load", "upto_round", lambda s, v: s.load(1, v)),
        ("rounds", "client", lambda s, v: s.rounds(v)),
        ("client_folder", "client", lambda s, v: s.client_folder(v)),
        ("commit", "server_round", lambda s, v: s.commit(v, [1])),
        ("commit", "client", lambda s, v: s.commit(1, [2, v])),
        ("rollback", "server_round", lambda s, v: s.rollback(v)),
        ("verify", "upto_round", lambda s, v: s.verify(v)),
    ],
)
def test_invalid_indices_raise_value_error(tmp_path: Path, where: str, name: str, call: Any, bad: Any) -> None:
    store = ClientStore(tmp_path)
    message = f"ClientStore.{where}: '{name}' must be an int >= 0. Got {bad!r}."
    with pytest.raises(ValueError, match=re.escape(message)):
        call(store, bad)
    assert not any(tmp_path.iterdir())  # nothing written


def test_invalid_index_message_is_exact(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as info:
        ClientStore(tmp_path).save(-1, 0, {})
    assert str(info.value) == "ClientStore.save: 'client' must be an int >= 0. Got -1."


def test_commit_checks_every_id_before_removing_anything(tmp_path: Path) -> None:
    store = ClientStore(tmp_path)
    _save_rounds(store, 1, [1, 2])
    with pytest.raises(ValueError, match=re.escape("ClientStore.commit: 'client' must be an int >= 0. Got -3.")):
        store.commit(2, [1, -3])
    assert store.rounds(1) == [1, 2]


@pytest.mark.parametrize(
    ("tensors", "metadata", "error", "pattern"),
    [
        ({"w": [1.0, 2.0]}, None, TypeError, r"ClientStore\.save: entry 'w' must be a torch\.Tensor\. Got list\."),
        ([("w", torch.zeros(1))], None, TypeError, r"ClientStore\.save: 'tensors' must be a Mapping"),
        ({1: torch.zeros(1)}, None, TypeError, r"ClientStore\.save: keys of 'tensors' must be str\. Got 1\."),
        ({"__metadata__": torch.zeros(1)}, None, ValueError, r"ClientStore\.save: '__metadata__' is reserved"),
        ({"w": torch.zeros(1)}, {"round": 3}, TypeError, r"ClientStore\.save: 'metadata' must map str to str"),
        ({"w": torch.zeros(1)}, {3: "x"}, TypeError, r"ClientStore\.save: 'metadata' must map str to str"),
        ({"w": torch.zeros(1)}, [("a", "b")], TypeError, r"ClientStore\.save: 'metadata' must be a Mapping"),
        ({"w": torch.zeros(1)}, {"fedcore.sha256": "0"}, ValueError,
         r"ClientStore\.save: metadata key 'fedcore\.sha256' is reserved for the file's seal"),
    ],
    ids=["not-a-tensor", "not-a-mapping", "int-key", "reserved-key", "int-value", "int-meta-key", "meta-list",
         "seal-key"],
)
def test_invalid_tensors_or_metadata_are_rejected(
    tmp_path: Path, tensors: Any, metadata: Any, error: type[Exception], pattern: str
) -> None:
    store = ClientStore(tmp_path)
    with pytest.raises(error, match=pattern):
        store.save(0, 1, tensors, metadata)
    assert not any(tmp_path.iterdir())  # nothing written, not even the client folder
