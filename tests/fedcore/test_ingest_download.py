"""fetch (mirror, resume over file and HTTP, checksums, errors) and extract_archive (safety, marker)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
import threading
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import fedcore.data.download as download
from fedcore.data.download import (
    EXTRACTED_MARKER,
    extract_archive,
    fetch,
    fetch_detailed,
    resolve_mirror,
    sha256_file,
)
from fedcore.errors import ChecksumError, DataError, DownloadError, UnsafeArchiveError

PAYLOAD = bytes(range(256)) * 4096  # 1 MiB, every offset distinguishable modulo 256
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()


# --------------------------------------------------------------------------------------------------- HTTP server
class _Server(ThreadingHTTPServer):
    payload: bytes = PAYLOAD
    honour_range: bool = True
    cut_first: bool = False
    ranges: list[str | None]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (signature of the base class)
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        server = self.server
        if self.path != "/data.bin":
            self.send_error(404)
            return
        asked = self.headers.get("Range")
        server.ranges.append(asked)
        data = server.payload
        if server.cut_first and len(server.ranges) == 1:  # promise everything, send half, hang up
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        if asked and server.honour_range:
            start = int(asked.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            body = data[start:]
        else:
            self.send_response(200)
            body = data
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def http_server() -> Iterator[_Server]:
    server = _Server(("127.0.0.1", 0), _Handler)
    server.ranges = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _url(server: _Server, path: str = "/data.bin") -> str:
    return f"http://127.0.0.1:{server.server_address[1]}{path}"


@pytest.fixture
def no_retry_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "_RETRY_BASE_S", 0.0)


# --------------------------------------------------------------------------------------------------- fetch: HTTP
def test_fetch_http_resumes_with_range(tmp_path: Path, http_server: _Server) -> None:
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD[:300_000])
    seen: list[tuple[int, int | None]] = []
    path = fetch(_url(http_server), tmp_path, sha256=PAYLOAD_SHA, progress=lambda d, t: seen.append((d, t)))
    assert path.read_bytes() == PAYLOAD
    assert http_server.ranges == ["bytes=300000-"]
    assert seen[0] == (300_000, len(PAYLOAD)) and seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert not (tmp_path / "data.bin.part").exists()
    assert (tmp_path / "data.bin.sha256").read_text().split()[0] == PAYLOAD_SHA


def test_fetch_http_restarts_when_server_ignores_range(tmp_path: Path, http_server: _Server) -> None:
    http_server.honour_range = False
    (tmp_path / "data.bin.part").write_bytes(b"\xff" * 5000)  # wrong bytes: must be overwritten, not kept
    path = fetch(_url(http_server), tmp_path, sha256=PAYLOAD_SHA)
    assert http_server.ranges == ["bytes=5000-"]
    assert path.read_bytes() == PAYLOAD


def test_fetch_http_retries_and_resumes_after_cut(
    tmp_path: Path, http_server: _Server, no_retry_delay: None
) -> None:
    http_server.cut_first = True
    path = fetch(_url(http_server), tmp_path, sha256=PAYLOAD_SHA, retries=2)
    assert path.read_bytes() == PAYLOAD
    assert http_server.ranges[0] is None
    assert http_server.ranges[1] is not None and http_server.ranges[1].startswith("bytes=")
    assert http_server.ranges[1] != "bytes=0-"


def test_fetch_http_errors_name_url_and_mirror(tmp_path: Path, http_server: _Server, no_retry_delay: None) -> None:
    mirror = tmp_path / "mirror"
    mirror.mkdir()  # exists, but lacks the archive: the URL is tried and its error names both
    with pytest.raises(DownloadError) as info:
        fetch(_url(http_server, "/missing.zip"), tmp_path / "dl", mirror=mirror, mirror_subdir="fsdd")
    message = str(info.value)
    assert "/missing.zip" in message and "HTTP 404" in message
    assert str(mirror / "fsdd") in message and "FEDAUDIO_MIRROR" in message and "download.mirror" in message

    port = http_server.server_address[1]
    http_server.shutdown()
    http_server.server_close()
    with pytest.raises(DownloadError, match="2 attempt"):
        fetch(f"http://127.0.0.1:{port}/data.bin", tmp_path / "dl", retries=2, timeout_s=2)


# --------------------------------------------------------------------------------------------------- fetch: files
def test_fetch_file_url_resumes_part(tmp_path: Path) -> None:
    source = tmp_path / "src" / "archive.zip"
    source.parent.mkdir()
    source.write_bytes(PAYLOAD)
    dest = tmp_path / "dl"
    dest.mkdir()
    (dest / "archive.zip.part").write_bytes(PAYLOAD[:123_457])
    seen: list[int] = []
    path = fetch(source.as_uri(), dest, sha256=PAYLOAD_SHA, progress=lambda d, t: seen.append(d))
    assert path == dest / "archive.zip" and path.read_bytes() == PAYLOAD
    assert seen[0] == 123_457  # resumed, not restarted


def test_fetch_reuses_verified_file(tmp_path: Path) -> None:
    source = tmp_path / "a.bin"
    source.write_bytes(PAYLOAD)
    first = fetch(str(source), tmp_path / "dl", sha256=PAYLOAD_SHA)
    mtime = first.stat().st_mtime_ns
    calls: list[int] = []
    result = fetch_detailed(str(source), tmp_path / "dl", sha256=PAYLOAD_SHA, progress=lambda d, t: calls.append(d))
    assert result.reused and result.sha256 == PAYLOAD_SHA and not calls
    assert first.stat().st_mtime_ns == mtime


def test_fetch_wrong_checksum_keeps_bad_file(tmp_path: Path) -> None:
    source = tmp_path / "a.bin"
    source.write_bytes(PAYLOAD)
    wrong = "0" * 64
    with pytest.raises(ChecksumError) as info:
        fetch(source.as_uri(), tmp_path / "dl", sha256=wrong)
    message = str(info.value)
    assert wrong in message and PAYLOAD_SHA in message and "download.sha256" in message
    assert (tmp_path / "dl" / "a.bin.bad").read_bytes() == PAYLOAD
    assert not (tmp_path / "dl" / "a.bin").exists() and not (tmp_path / "dl" / "a.bin.part").exists()


def test_fetch_prefers_mirror_and_checks_its_sidecar(tmp_path: Path) -> None:
    mirror = tmp_path / "mirror"
    (mirror / "ds").mkdir(parents=True)
    copy = mirror / "ds" / "offline-copy.zip"
    copy.write_bytes(PAYLOAD)
    (mirror / "ds" / "offline-copy.zip.sha256").write_text(f"{PAYLOAD_SHA}  offline-copy.zip\n")
    result = fetch_detailed(
        "http://127.0.0.1:9/never-contacted.zip", tmp_path / "dl", filename="archive.zip",
        mirror=mirror, mirror_subdir="ds", mirror_names=("offline-copy.zip",),
    )
    assert result.source == str(copy) and result.path.name == "offline-copy.zip"
    assert result.path.read_bytes() == PAYLOAD

    (mirror / "ds" / "offline-copy.zip.sha256").write_text(f"{'1' * 64}  offline-copy.zip\n")
    with pytest.raises(ChecksumError, match="1" * 64):
        fetch_detailed("http://127.0.0.1:9/x.zip", tmp_path / "dl2", filename="archive.zip", mirror=mirror,
                       mirror_subdir="ds", mirror_names=("offline-copy.zip",))


def test_fetch_missing_file_names_mirror_folders(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    with pytest.raises(DownloadError) as info:
        fetch((tmp_path / "none.zip").as_uri(), tmp_path / "dl", mirror=tmp_path / "m", mirror_subdir="fsdd")
    message = str(info.value)
    assert "none.zip" in message and str(tmp_path / "m" / "fsdd") in message and "FEDAUDIO_MIRROR" in message


def test_resolve_mirror_env_overrides_config(tmp_path: Path) -> None:
    (tmp_path / "cfg").mkdir()
    assert resolve_mirror("cfg-missing", environ={"FEDAUDIO_MIRROR": str(tmp_path)}) == tmp_path
    assert resolve_mirror(str(tmp_path / "cfg"), environ={}) == tmp_path / "cfg"
    assert resolve_mirror(None, environ={"FEDAUDIO_MIRROR": ""}) is None


@pytest.mark.parametrize("via_env", [True, False])
def test_resolve_mirror_missing_folder_is_an_error(tmp_path: Path, via_env: bool) -> None:
    missing = tmp_path / "no-such-mirror"
    environ = {"FEDAUDIO_MIRROR": str(missing)} if via_env else {}
    with pytest.raises(DownloadError) as info:
        resolve_mirror(None if via_env else str(missing), environ=environ)
    message = str(info.value)
    assert str(missing) in message and "no such folder" in message
    assert ("env FEDAUDIO_MIRROR" if via_env else "download.mirror") in message
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(DownloadError, match="a file, not a folder"):
        resolve_mirror(str(tmp_path / "a-file"), environ={})


def test_fetch_refuses_missing_mirror_before_any_download(tmp_path: Path, http_server: _Server) -> None:
    with pytest.raises(DownloadError, match="mirror .* must be an existing folder"):
        fetch(_url(http_server), tmp_path / "dl", mirror=tmp_path / "typo", mirror_subdir="fsdd")
    assert http_server.ranges == []  # the URL was never asked: no silent fallback to the internet
    assert not (tmp_path / "dl").exists()


def test_fetch_rejects_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'sha256' must be 64 hex digits"):
        fetch("file:///x.zip", tmp_path, sha256="abc")
    with pytest.raises(ValueError, match="'url' must be an http, https or file URL"):
        fetch("ftp://host/x.zip", tmp_path)


# --------------------------------------------------------------------------------------------------- extract
def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _tar(path: Path, members: list[tarfile.TarInfo], data: dict[str, bytes] | None = None) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for member in members:
            payload = (data or {}).get(member.name)
            if payload is not None:
                member.size = len(payload)
                tf.addfile(member, io.BytesIO(payload))
            else:
                tf.addfile(member)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    member = tarfile.TarInfo(name)
    member.type, member.linkname = kind, link
    return member


def _unsafe_archives(tmp: Path) -> list[Path]:
    good = {"top/ok.txt": b"fine"}
    return [
        _zip(tmp / "dotdot.zip", {**good, "../evil.txt": b"x"}),
        _zip(tmp / "nested.zip", {**good, "top/../../evil.txt": b"x"}),
        _zip(tmp / "absolute.zip", {**good, "/tmp/evil_abs.txt": b"x"}),
        _tar(tmp / "dotdot.tar.gz", [_info("top/ok.txt"), _info("../evil.txt")],
             {"top/ok.txt": b"f", "../evil.txt": b"x"}),
        _tar(tmp / "absolute.tgz", [_info("top/ok.txt"), _info("/tmp/evil_abs.txt")],
             {"top/ok.txt": b"f", "/tmp/evil_abs.txt": b"x"}),
        _tar(tmp / "symlink.tar.gz", [_info("top/link", tarfile.SYMTYPE, "../../evil")]),
        _tar(tmp / "hardlink.tar.gz", [_info("top/hard", tarfile.LNKTYPE, "../evil")]),
        _tar(tmp / "device.tar.gz", [_info("top/dev", tarfile.CHRTYPE)]),
    ]


def test_extract_rejects_unsafe_members_before_writing(tmp_path: Path) -> None:
    archives = tmp_path / "archives"
    archives.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    for archive in _unsafe_archives(archives):
        with pytest.raises(UnsafeArchiveError) as info:
            extract_archive(archive, work / "out")
        assert archive.name in str(info.value) and "Nothing was extracted" in str(info.value)
        assert list(work.iterdir()) == [], archive.name  # neither dest nor a partial folder
    assert not (tmp_path / "evil.txt").exists() and not Path("/tmp/evil_abs.txt").exists()


def test_extract_zip_and_tar_then_skip_when_marker_matches(tmp_path: Path) -> None:
    for archive in (_zip(tmp_path / "a.zip", {"top/sub/x.txt": b"zip"}),
                    _tar(tmp_path / "a.tar.gz", [_info("top/sub/x.txt")], {"top/sub/x.txt": b"zip"})):
        dest = extract_archive(archive, tmp_path / f"out-{archive.name}")
        extracted = dest / "top" / "sub" / "x.txt"
        assert extracted.read_bytes() == b"zip"
        assert sha256_file(archive) in (dest / EXTRACTED_MARKER).read_text()
        mtime = extracted.stat().st_mtime_ns
        os.utime(extracted, ns=(mtime - 10**9, mtime - 10**9))
        extract_archive(archive, dest)
        assert extracted.stat().st_mtime_ns == mtime - 10**9  # not extracted again


def test_extract_replaces_folder_when_archive_changes(tmp_path: Path) -> None:
    dest = extract_archive(_zip(tmp_path / "a.zip", {"old.txt": b"1"}), tmp_path / "out")
    extract_archive(_zip(tmp_path / "a.zip", {"new.txt": b"22"}), dest)
    assert sorted(p.name for p in dest.iterdir()) == [EXTRACTED_MARKER, "new.txt"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_extract_interrupted_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    archive = _zip(tmp_path / "a.zip", {"top/x.txt": b"1"})

    def boom(self: object, member: object, src: object, target: Path) -> None:
        target.write_text("half")
        raise KeyboardInterrupt

    monkeypatch.setattr(download._Budget, "write", boom)
    with pytest.raises(KeyboardInterrupt):
        extract_archive(archive, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zip"]


def test_extract_rejects_non_archive(tmp_path: Path) -> None:
    junk = tmp_path / "junk.zip"
    junk.write_bytes(b"not an archive at all")
    with pytest.raises(DataError, match="must be a zip or tar"):
        extract_archive(junk, tmp_path / "out")
