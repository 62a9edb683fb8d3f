"""fetch over HTTP (resume, restart, retry, redirect) and tar extraction through tarfile's data filter.

The HTTP cases run against a local server whose every answer is scripted, so each status the resume logic reads
(206 at the right or wrong offset, 200 for a range, 416, 503, 404, 302) is met once.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import subprocess
import sys
import tarfile
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import fedcore.data.download as download
from fedcore.data.download import extract_archive_detailed, fetch
from fedcore.errors import DownloadError, UnsafeArchiveError

PAYLOAD = bytes(range(256)) * 1024  # 256 KiB, every offset distinguishable modulo 256
PAYLOAD_SHA = hashlib.sha256(PAYLOAD).hexdigest()

Answer = Callable[["_Handler", str | None], None]


# --------------------------------------------------------------------------------------------------- HTTP server
class _Server(ThreadingHTTPServer):
    answers: list[Answer]  # one per request, in order; the last one repeats
    requests: list[tuple[str, str | None]]  # (path, Range header)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (signature of the base class)
        pass

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        asked = self.headers.get("Range")
        self.server.requests.append((self.path, asked))
        answers = self.server.answers
        answers[min(len(self.server.requests), len(answers)) - 1](self, asked)

    def send(self, code: int, body: bytes = b"", **headers: str) -> None:
        self.send_response(code)
        for name, value in {"Content-Length": str(len(body)), **headers}.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        self.wfile.write(body)


def whole(handler: _Handler, asked: str | None) -> None:
    handler.send(200, PAYLOAD)


def ranged(handler: _Handler, asked: str | None) -> None:
    if asked is None:
        whole(handler, asked)
        return
    start = int(asked.removeprefix("bytes=").split("-")[0])
    handler.send(206, PAYLOAD[start:], Content_Range=f"bytes {start}-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")


@pytest.fixture
def server() -> Iterator[_Server]:
    httpd = _Server(("127.0.0.1", 0), _Handler)
    httpd.answers, httpd.requests = [ranged], []
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def _url(httpd: _Server, path: str = "/data.bin") -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}{path}"


@pytest.fixture(autouse=True)
def no_retry_delay(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(download, "_RETRY_BASE_S", 0.0)


# --------------------------------------------------------------------------------------------------- fetch: HTTP
def test_fetch_http_partial_file_already_complete_is_kept(tmp_path: Path, server: _Server) -> None:
    def unsatisfiable(handler: _Handler, asked: str | None) -> None:
        handler.send(416, Content_Range=f"bytes */{len(PAYLOAD)}")

    server.answers = [unsatisfiable]
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD)
    seen: list[int] = []
    path = fetch(_url(server), tmp_path, sha256=PAYLOAD_SHA, progress=lambda done, total: seen.append(done))
    assert path.read_bytes() == PAYLOAD and server.requests == [("/data.bin", f"bytes={len(PAYLOAD)}-")]
    assert seen == []  # no body was read


def test_fetch_http_resumed_at_the_wrong_offset_restarts(tmp_path: Path, server: _Server) -> None:
    def wrong_offset(handler: _Handler, asked: str | None) -> None:
        handler.send(206, PAYLOAD[10:], Content_Range=f"bytes 10-{len(PAYLOAD) - 1}/{len(PAYLOAD)}")

    server.answers = [wrong_offset, ranged]
    (tmp_path / "data.bin.part").write_bytes(PAYLOAD[:1000])
    path = fetch(_url(server), tmp_path, sha256=PAYLOAD_SHA, retries=2)
    assert path.read_bytes() == PAYLOAD
    assert [asked for _, asked in server.requests] == ["bytes=1000-", None]  # the bad part was dropped


def test_fetch_http_retries_server_errors_but_not_a_missing_file(tmp_path: Path, server: _Server) -> None:
    def busy(handler: _Handler, asked: str | None) -> None:
        handler.send(503, b"try later")

    server.answers = [busy, ranged]
    assert fetch(_url(server), tmp_path / "a", sha256=PAYLOAD_SHA, retries=2).read_bytes() == PAYLOAD
    assert len(server.requests) == 2

    def missing(handler: _Handler, asked: str | None) -> None:
        handler.send(404, b"no")

    server.answers, server.requests = [missing], []
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(_url(server), tmp_path / "b", retries=3)
    assert len(server.requests) == 1  # another attempt cannot fix a 404
    server.answers = [busy]
    with pytest.raises(DownloadError, match=r"2 attempt\(s\) failed, last: _Retry: HTTP 503"):
        fetch(_url(server), tmp_path / "c", retries=2)


def test_fetch_http_follows_a_redirect_and_reports_progress(tmp_path: Path, server: _Server) -> None:
    def moved(handler: _Handler, asked: str | None) -> None:
        if handler.path == "/old.bin":
            handler.send(302, Location="/data.bin")
        else:
            ranged(handler, asked)

    server.answers = [moved]
    seen: list[tuple[int, int | None]] = []
    path = fetch(_url(server, "/old.bin"), tmp_path, filename="data.bin", sha256=PAYLOAD_SHA,
                 progress=lambda done, total: seen.append((done, total)))
    assert path.read_bytes() == PAYLOAD and [p for p, _ in server.requests] == ["/old.bin", "/data.bin"]
    assert seen[0] == (0, len(PAYLOAD)) and seen[-1] == (len(PAYLOAD), len(PAYLOAD))
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)


def test_importing_download_does_not_load_requests() -> None:
    code = "import sys, fedcore.data.download; print(sorted({'requests'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------------- extract: tar
def _tar(path: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return path


def _info(name: str, kind: bytes = tarfile.REGTYPE, link: str = "", mode: int = 0o644, mtime: int = 0
          ) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode, info.mtime = kind, link, mode, mtime
    return info


@pytest.mark.parametrize(("member", "reason"), [
    (_info("top/link", tarfile.SYMTYPE, "/etc/passwd"), "AbsoluteLinkError"),
    (_info("top/fifo", tarfile.FIFOTYPE), "SpecialFileError"),
    (_info("top/block", tarfile.BLKTYPE), "SpecialFileError"),
    (_info("top/../../up.txt"), "OutsideDestinationError"),
    (_info("top/sub/link", tarfile.SYMTYPE, "../../.."), "LinkOutsideDestinationError"),
    (_info("./"), "a file without a name"),
])
def test_extract_tar_refuses_what_the_data_filter_refuses(tmp_path: Path, member: tarfile.TarInfo,
                                                         reason: str) -> None:
    data = b"x" if member.isreg() else None
    archive = _tar(tmp_path / "bad.tar.gz", [(_info("top/ok.txt"), b"fine"), (member, data)])
    work = tmp_path / "work"
    work.mkdir()
    with pytest.raises(UnsafeArchiveError, match=reason) as info:
        extract_archive_detailed(archive, work / "out")
    assert "bad.tar.gz" in str(info.value) and "Nothing was extracted" in str(info.value)
    assert list(work.iterdir()) == []


def test_extract_tar_leaves_links_out_and_ignores_modes_and_times(tmp_path: Path) -> None:
    archive = _tar(tmp_path / "a.tar.gz", [
        (_info("top", tarfile.DIRTYPE, mode=0o777), None),
        (_info("top/x.bin", mode=0o4777), b"data"),
        (_info("top/soft", tarfile.SYMTYPE, "x.bin"), None),
        (_info("top/hard", tarfile.LNKTYPE, "top/x.bin"), None),
    ])
    previous = os.umask(0o022)
    try:
        result = extract_archive_detailed(archive, tmp_path / "out")
    finally:
        os.umask(previous)
    assert result.skipped == [
        {"member": "top/soft", "reason": "symlink to 'x.bin': links are not extracted"},
        {"member": "top/hard", "reason": "hard link to 'top/x.bin': links are not extracted"},
    ]
    top = result.path / "top"
    assert sorted(p.name for p in top.iterdir()) == ["x.bin"] and (top / "x.bin").read_bytes() == b"data"
    assert stat.S_IMODE(top.stat().st_mode) == 0o755 and stat.S_IMODE((top / "x.bin").stat().st_mode) == 0o644
    assert (top / "x.bin").stat().st_mtime > 10**9  # the extraction time, not the archive's 1970
