"""Entry-point plumbing shared by every stage: argv, params check, quiet Prefect settings, exit codes.

Every stage also leaves nothing running behind it. A watchdog process (:func:`watch`) follows the stage and, if
the stage dies without exiting normally (kill -9 included), ends every process the stage started and left:
Prefect's temporary API server, the processes of a local Dask or Ray cluster, runner workers. With no server
configured, the stages share one (:mod:`tasks.server`): its keeper outlives a stage and stops itself once no stage
has used it for a minute. With ``FEDAUDIO_SHARED_SERVER=0`` each stage starts a temporary server of its own, and
its child processes use that server (``PREFECT_API_URL``) instead of starting one each.

An interrupted stage (Ctrl-C, which the terminal sends to the whole foreground process group, or SIGTERM) exits
within seconds. Its temporary server runs in a session of its own, so the signal does not reach it and the stage
can still record its runs as Crashed; and if the stage has not exited :data:`INTERRUPT_GRACE_S` after the signal
(the server it reports to is gone, and Prefect's client retries for minutes), it ends itself and the watchdog ends
what it left. Checkpoints are written atomically per round, so the stage resumes from the last one.

A stage's command line is the signature of one function (:func:`command`, on typer), parsed before anything slow is
imported: ``python -m flows.<stage> --help`` and a mistyped option answer at once. Its Prefect flows are built on
first use (:class:`LazyFlows`), so importing a stage module does not import Prefect, torch or the tasks.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import ctypes.util
import functools
import inspect
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import IO, Annotated, Any, TypeVar

import typer

from fedcore.errors import ConfigError, FedcoreError

QUIET_ENV = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "true",
    "DVC_NO_ANALYTICS": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
}


MALLOC_ARENAS = 2
"""glibc malloc arenas a stage keeps (``mallopt(M_ARENA_MAX)``; glibc's default allows 8 per core). Each client
thread would otherwise leave the tensors it freed in an arena of its own: about 50 MB of the reference workload's
peak (benchmarks/reference). Env ``MALLOC_ARENA_MAX``, which glibc reads at start, wins."""
_M_ARENA_MAX = -8  # glibc's malloc.h


def limit_malloc_arenas(arenas: int = MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas for the threads this process starts from now on; False where it does not apply.

    Arenas change where freed memory is kept, never what is computed. Not glibc (or ``MALLOC_ARENA_MAX`` set):
    nothing changes.
    """
    if os.environ.get("MALLOC_ARENA_MAX") or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False


STUDY_NAMES = ("fedavg", "personalised", "fassl", "modalitymirror", "earlyexit")
"""The studies (the keys of :data:`tasks.studies.STUDIES`, which a test keeps equal), named here so that the help of
``fedaudio`` and ``python -m flows.pipeline`` lists them without importing the params schema."""

PARAMS_FILE = Path("params.yaml")
"""The params file a stage reads unless ``--params`` names another."""
ParamsFile = Annotated[Path, typer.Option("--params", metavar="FILE", help="the params file (the stage checks "
                                          "all of it and reads its own sections)")]
"""The ``--params`` option every stage has: ``params: stage.ParamsFile = stage.PARAMS_FILE``."""

# The path options several stages share (``features: stage.FeaturesDir = Path("data/features")``); the default
# stays with each stage (its paths dataclass), the help is said once.
FeaturesDir = Annotated[Path, typer.Option(metavar="DIR", help="the feature store (features stage)")]
PartitionFile = Annotated[Path, typer.Option(metavar="FILE", help="the clients' partition.json (partition stage)")]
VisualDir = Annotated[Path, typer.Option(metavar="DIR", help="the visual store (av stage)")]
CheckpointsDir = Annotated[Path, typer.Option(metavar="DIR", help="the round checkpoints a killed run resumes from")]
MetricsFile = Annotated[Path, typer.Option(metavar="FILE", help="the stage's summary metrics (JSON; the run record "
                                           "beside it)")]
PlotsDir = Annotated[Path, typer.Option(metavar="DIR", help="the per-round table and plot (rounds.tsv, rounds.png)")]


def command(doc: str | None, function: Callable[..., Any], *, prefect: bool = True,
            check: Callable[[dict[str, Any]], None] | None = None) -> Callable[..., int]:
    """A stage's ``main(argv=None, prog_name=None)``: the parameters of ``function`` are its options.

    Each parameter of ``function`` is a typer option or argument (``Annotated[Path, typer.Option(help=...)]``, its
    default the option's); ``doc`` (the module's docstring) is the help text, and the program is named
    ``python -m <module>`` unless ``prog_name`` says otherwise (``fedaudio stage <name>``). ``main`` parses its
    ``argv`` (default: this process's arguments) first: ``--help`` returns 0 and a usage error prints one error
    and returns 2, before anything slow is imported. Then ``function(**options)`` runs: as a stage
    (:func:`run_stage`: watchdog, shared Prefect server, interrupts, exit codes), so ``function`` must take
    ``params`` (:data:`ParamsFile`); or, with ``prefect=False``, as it is, returning the exit code (``None``: 0).
    ``check(options)``, when given, checks what one option cannot check alone (``typer.BadParameter``: a usage
    error, exit code 2) before the stage starts.
    """
    if prefect and "params" not in inspect.signature(function).parameters:
        raise TypeError(f"stage.command: {function.__qualname__} must take 'params' (stage.ParamsFile).")
    spec = getattr(sys.modules.get(function.__module__), "__spec__", None)
    program = f"python -m {spec.name if spec is not None else function.__module__}"
    help_text = plain(doc or "")

    def main(argv: Sequence[str] | None = None, prog_name: str | None = None) -> int:
        """Command-line entry point: parse ``argv``, run the stage, return its exit code."""
        options = parse(function, help_text, argv, prog_name or program, check)
        if isinstance(options, int):
            return options
        if prefect:
            return run_stage(options["params"], lambda: function(**options))
        return int(function(**options) or 0)

    return main


def parse(function: Callable[..., Any], help_text: str, argv: Sequence[str] | None, prog_name: str,
          check: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | int:
    """``function``'s keyword arguments from ``argv`` (typer), or an exit code: 0 after ``--help``, 2 on bad usage.

    Only the parsing runs under typer: the stage itself runs after it, so that an interrupt or an error in the
    stage is not turned into typer's exit codes.
    """
    parsed: list[dict[str, Any]] = []

    @functools.wraps(function)  # typer reads the options from function's signature
    def collect(**options: Any) -> None:
        if check is not None:
            check(options)
        parsed.append(options)

    app = typer.Typer(add_completion=False, rich_markup_mode=None, pretty_exceptions_enable=False,
                      context_settings={"help_option_names": ["-h", "--help"]})
    app.command(help=help_text)(collect)
    code: int | str | None = 0
    try:
        app(args=list(sys.argv[1:] if argv is None else argv), prog_name=prog_name)
    except SystemExit as done:  # typer ends with it: 0 once parsed or after --help, 2 on a usage error
        code = done.code
    if parsed:
        return parsed[0]
    return code if isinstance(code, int) else 1


_ROLE = re.compile(r":[a-z]+:`~?([^`]+)`")
_LITERAL = re.compile(r"``([^`]+)``")
_EMPHASIS = re.compile(r"(?<![\w*`])\*([A-Za-z][^*`]*?)\*(?![\w*`])")


def plain(doc: str) -> str:
    """A docstring as help text: ``literals``, :role:`targets` and *emphasis* without their reST marks.

    A paragraph that is one literal alone (a command line) is kept as it is, not rewrapped.
    """
    paragraphs = []
    for paragraph in inspect.cleandoc(_EMPHASIS.sub(r"\1", _ROLE.sub(r"\1", doc))).split("\n\n"):
        whole = _LITERAL.fullmatch(paragraph.strip())
        paragraphs.append(f"\b\n{whole.group(1)}" if whole else _LITERAL.sub(r"\1", paragraph))
    return "\n\n".join(paragraphs)


F = TypeVar("F", bound=Callable[..., Any])


class LazyFlows:
    """A stage module's Prefect flows and tasks, each built on first use (without Prefect: the plain functions).

    Importing Prefect takes seconds, and a module that builds its flows when imported makes every import of it (its
    ``--help`` included) wait for Prefect, torch and the tasks. A stage module registers its flow functions here
    instead, uses them as ``FLOWS["name"]`` and ends with ``__getattr__ = FLOWS.module_getattr`` (PEP 562), so that
    ``from flows.features import features`` still gives the flow, built at that first access. Flow names (what
    Prefect shows) are the registered names unless ``name=`` says otherwise.
    """

    def __init__(self, module: str) -> None:
        self._module = module
        self._builders: dict[str, Callable[[], Any]] = {}
        self._built: dict[tuple[str, bool], Any] = {}
        self._lock = threading.RLock()

    def flow(self, attribute: str, **options: Any) -> Callable[[F], F]:
        """Register the decorated function as flow ``attribute``: ``prefect.flow(function, **options)``."""
        return self._decorator("flow", attribute, options)

    def task(self, attribute: str, **options: Any) -> Callable[[F], F]:
        """Register the decorated function as task ``attribute``: ``prefect.task(function, **options)``."""
        return self._decorator("task", attribute, options)

    def _decorator(self, kind: str, attribute: str, options: dict[str, Any]) -> Callable[[F], F]:
        def register(function: F) -> F:
            def build() -> Any:
                from tasks.orchestration import Task, orchestrated

                wrapped = Task(function, {"name": attribute, **options}, kind)
                return wrapped.prefect() if orchestrated() else wrapped

            self.add(attribute, build)
            return function

        return register

    def add(self, attribute: str, build: Callable[[], Any]) -> None:
        """Register ``build()`` (called once, on first use) as what ``attribute`` gives."""
        if attribute in self._builders:
            raise ValueError(f"{self._module}: flow {attribute!r} is registered twice.")
        self._builders[attribute] = build

    def __getitem__(self, attribute: str) -> Any:
        from tasks.orchestration import orchestrated

        key = (attribute, orchestrated())
        with self._lock:
            if key not in self._built:
                self._built[key] = self._builders[attribute]()
            return self._built[key]

    def module_getattr(self, name: str) -> Any:
        """The module's ``__getattr__``: a registered flow, built now; any other name is missing."""
        if name not in self._builders:
            raise AttributeError(f"module {self._module!r} has no attribute {name!r}")
        return self[name]


def parser(description: str) -> argparse.ArgumentParser:
    """Argument parser with the options every stage has (:func:`entry`'s; flows/ uses :func:`command`)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    return p


WATCH_INTERVAL_S = 1.0
"""How often the watchdog checks its stage and lists the stage's descendants."""
REAP_GRACE_S = 3.0
"""How long a left process has to end after SIGTERM before it gets SIGKILL."""
INTERRUPT_GRACE_S = 10.0
"""How long an interrupted stage has to record its runs and exit before it ends itself."""
_DONE = b"done\n"
_watchdog: subprocess.Popen[bytes] | None = None
_deadline: threading.Timer | None = None


def run(main: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """Run ``main(args)`` as a stage (:func:`run_stage`); ``args.params`` names the params file in its errors."""
    return run_stage(args.params, lambda: main(args))


def run_stage(params: str | Path, work: Callable[[], Any], *, task_logs: bool = False) -> int:
    """Run a stage: heartbeat off (saves ~1 s per flow), clear one-line errors for bad input, exit code.

    Also caps glibc's malloc arenas (:func:`limit_malloc_arenas`), starts the stage's watchdog (once per process),
    shares Prefect's temporary server with children, keeps that server out of the terminal's signals, and bounds
    the time an interrupted stage takes to exit. ``params``
    (the params file) is named when it is invalid. Task runs log warnings and errors only (a stage runs a task
    per client and round), unless ``task_logs`` (the pipeline: a task per stage, whose log is DVC's output) or
    env ``FEDAUDIO_VERBOSE`` is set. Without Prefect (env ``FEDAUDIO_PREFECT=off``, :mod:`tasks.orchestration`)
    only the malloc cap, the errors and the exit code remain.
    """
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)
    limit_malloc_arenas()  # before any client thread exists
    from tasks.orchestration import orchestrated

    try:
        with_prefect = orchestrated()
    except ConfigError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if not with_prefect:  # FEDAUDIO_PREFECT=off: no server, no flow run, nothing left beside the stage to reap
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
        if threading.current_thread() is threading.main_thread() \
                and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _exit_on_signal)  # the MLflow run then ends KILLED, as under Prefect
        return exit_code(params, work)
    start_watchdog()
    _attach_shared_server()
    if not os.environ.get("PREFECT_API_URL"):  # this process may start a temporary server (importing it: ~4 s)
        share_temporary_server()
        detach_temporary_server()
    # Importing these sets up Prefect's logging (its console handler on the root logger), which basicConfig then
    # leaves alone: the other way round, every library's INFO records (httpx's requests) would reach the terminal.
    from prefect import tags
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # One line per client task per round drowns the progress bar; task failures are still logged (WARNING+).
    if not (task_logs or os.environ.get("FEDAUDIO_VERBOSE")):
        logging.getLogger("prefect.task_runs").setLevel(logging.WARNING)

    # A stage the pipeline flow runs: its flow run carries the pipeline run's tag (flows.pipeline.pipeline_tag).
    pipeline_run = os.environ.get("FEDAUDIO_PIPELINE_RUN")
    stage_tags = [f"pipeline-run:{pipeline_run}"] if pipeline_run else []
    with exit_when_interrupted(INTERRUPT_GRACE_S), tags(*stage_tags), \
            temporary_settings({PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        return exit_code(params, work)


def _exit_on_signal(number: int, frame: FrameType | None) -> None:
    """SIGTERM without Prefect: unwind as an interrupt does (``SystemExit``, exit code 128 + the signal's number)."""
    signal.signal(number, signal.SIG_DFL)  # a second one ends the process at once
    raise SystemExit(128 + number)


def exit_code(params: str | Path, work: Callable[[], Any]) -> int:
    """Run ``work()``: 0, or 2 after invalid params (``params`` named), 1 after another error of the input."""
    try:
        work()
    except ConfigError as error:
        print(f"error: invalid params ({params}):\n{error}", file=sys.stderr)
        return 2
    except (FedcoreError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def _attach_shared_server() -> None:
    """Use the server the stages share (:mod:`tasks.server`); on failure, say so and start one of its own."""
    from tasks import server

    try:
        server.attach()
    except (OSError, RuntimeError) as error:
        print(f"warning: {error}; this stage starts a temporary Prefect server of its own", file=sys.stderr)


def entry(description: str, add_arguments: Callable[[argparse.ArgumentParser], None],
          main: Callable[[argparse.Namespace], Any], argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` with argparse and run ``main`` (for scripts outside flows/; its stages use :func:`command`)."""
    p = parser(description)
    add_arguments(p)
    return run(main, p.parse_args(argv))


def start_watchdog() -> None:
    """Start this process's watchdog (:func:`watch`), once; it stops quietly when this process exits normally.

    The watchdog runs in its own session (no Ctrl-C or hang-up from the terminal reaches it) and reads a pipe
    from this process: ``done`` at exit (an :mod:`atexit` handler registered before Prefect's, so it runs after
    Prefect has stopped its server) means nothing to clean; the end of the pipe, or this process gone, means
    this process died, and the watchdog ends what it left.
    """
    global _watchdog
    if _watchdog is not None and _watchdog.poll() is None:
        return
    _watchdog = subprocess.Popen(
        [sys.executable, "-c", "import sys; from flows.stage import watch; watch(int(sys.argv[1]))",
         str(os.getpid())],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True,
    )
    atexit.register(_stop_watchdog, _watchdog)


def _stop_watchdog(watchdog: subprocess.Popen[bytes]) -> None:
    stdin: IO[bytes] | None = watchdog.stdin
    try:
        if stdin is not None:
            stdin.write(_DONE)
            stdin.close()
        watchdog.wait(timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        watchdog.kill()


def watch(parent: int, interval_s: float = WATCH_INTERVAL_S, grace_s: float = REAP_GRACE_S) -> int:
    """Follow process ``parent`` (this watchdog's parent); when it dies, end every descendant it left.

    While ``parent`` lives, its descendants are listed every ``interval_s`` (a process that starts and is
    orphaned within one interval can be missed). When ``parent`` is gone (its pipe closed without ``done``, or
    this process re-parented), each listed process still running, and its own descendants, gets SIGTERM, then
    SIGKILL after ``grace_s``. Processes the parent did not start (a server it was handed) are never touched.
    Returns the number of processes ended.
    """
    import psutil

    for number in (signal.SIGINT, signal.SIGHUP):
        signal.signal(number, signal.SIG_IGN)
    stdin, reading, me = sys.stdin.fileno(), True, os.getpid()
    known: dict[int, psutil.Process] = {}
    try:
        watched = psutil.Process(parent)
    except psutil.NoSuchProcess:
        return 0
    while os.getppid() == parent:
        if reading and select.select([stdin], [], [], interval_s)[0]:
            data = os.read(stdin, 64)
            if data.startswith(_DONE):
                return 0
            if not data:
                reading = False  # the parent is gone, or exiting: one last look at its descendants
        elif not reading:
            time.sleep(interval_s)
        try:
            children = watched.children(recursive=True)
        except psutil.NoSuchProcess:
            break
        spared = _shared_server_processes(children)
        for child in children:
            if child.pid != me and child.pid not in spared:
                known.setdefault(child.pid, child)
        known = {pid: p for pid, p in known.items() if p.is_running()}
    left = _still_running(known.values())
    names = ", ".join(f"{_name(p)} ({p.pid})" for p in left)
    for process in left:
        try:
            process.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(left, timeout=grace_s)
    for process in alive:
        try:
            process.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)
    if left:
        try:
            print(f"stage watchdog: process {parent} ended without cleaning up; ended the {len(left)} processes "
                  f"it left: {names}", file=sys.stderr, flush=True)
        except OSError:
            pass  # nobody reads the stage's stderr any more
    return len(left)


def _shared_server_processes(processes: list[Any]) -> set[int]:
    """Process ids of the shared server's keeper among ``processes`` and of its own descendants (``tasks.server``).

    The keeper a stage starts serves the stages after it and stops itself once idle, so it is never reaped.
    """
    import psutil

    from tasks.server import KEEPER_MARK

    spared: set[int] = set()
    for process in processes:
        try:
            if KEEPER_MARK in process.cmdline():
                spared.add(process.pid)
                spared.update(child.pid for child in process.children(recursive=True))
        except psutil.Error:
            continue
    return spared


def _still_running(processes: Any) -> list[Any]:
    """``processes`` still running (not zombies), with their own descendants, each once."""
    import psutil

    found: dict[int, psutil.Process] = {}
    for process in processes:
        try:
            if process.is_running() and process.status() != psutil.STATUS_ZOMBIE:
                found.setdefault(process.pid, process)
                for child in process.children(recursive=True):
                    found.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            continue
    return list(found.values())


def _name(process: Any) -> str:
    try:
        return str(process.name())
    except Exception:  # noqa: BLE001 - gone meanwhile
        return "?"


def share_temporary_server() -> None:
    """Once Prefect starts its temporary API server in this process, export its URL as ``PREFECT_API_URL``.

    Child processes then report to that server: the client workers of the processes, dask and ray runners (each
    of which would otherwise start a temporary server of its own, ~230 MB and seconds each) and the stages
    the pipeline flow runs. The variable is removed when the server stops. Nothing changes when
    ``PREFECT_API_URL`` is set already (a server this process did not start).
    """
    from prefect.server.api.server import SubprocessASGIServer

    start, stop = SubprocessASGIServer.start, SubprocessASGIServer.stop
    if getattr(start, "_shares_url", False):
        return

    def start_and_share(self: SubprocessASGIServer, timeout: int | None = None) -> None:
        start(self, timeout)
        if self.running and self.port is not None and not os.environ.get("PREFECT_API_URL"):
            os.environ["PREFECT_API_URL"] = self.api_url

    def stop_and_unshare(self: SubprocessASGIServer) -> None:
        if self.port is not None and os.environ.get("PREFECT_API_URL") == self.api_url:
            del os.environ["PREFECT_API_URL"]
        stop(self)

    start_and_share._shares_url = True  # type: ignore[attr-defined]
    SubprocessASGIServer.start = start_and_share  # type: ignore[method-assign]
    SubprocessASGIServer.stop = stop_and_unshare  # type: ignore[method-assign]


class _SubprocessInOwnSession:
    """The :mod:`subprocess` module as Prefect's server module sees it: each process it starts has its own session."""

    def __getattr__(self, name: str) -> Any:
        return getattr(subprocess, name)

    @staticmethod
    def Popen(*args: Any, **kwargs: Any) -> subprocess.Popen[Any]:  # noqa: N802 - stands for subprocess.Popen
        kwargs.setdefault("start_new_session", True)
        return subprocess.Popen(*args, **kwargs)


def detach_temporary_server() -> None:
    """Start Prefect's temporary API server in a session (and process group) of its own.

    A terminal sends Ctrl-C to its whole foreground process group, and ``kill -- -<pgid>`` reaches a whole group
    too. Left in the stage's group, the server dies at once, and the interrupted stage then spends minutes in
    Prefect's client retrying to record its runs as Crashed (5 retries with back-off per request, for each run
    state, event and log batch). In its own session the server keeps serving until the stage has recorded its
    runs and stops it at exit; a stage that dies without exiting normally leaves it to the watchdog, as it
    leaves a local cluster's processes.
    """
    from prefect.server.api import server

    if not isinstance(server.subprocess, _SubprocessInOwnSession):
        server.subprocess = _SubprocessInOwnSession()  # type: ignore[assignment]


@contextlib.contextmanager
def exit_when_interrupted(grace_s: float = INTERRUPT_GRACE_S) -> Iterator[None]:
    """While in this block: once SIGINT or SIGTERM arrives, give this process ``grace_s`` to exit, then end it.

    The signal still does what it did (KeyboardInterrupt; Prefect's flow engine records the runs as Crashed),
    but a process that has not exited ``grace_s`` later (the server it reports to is gone and Prefect's client
    and event and log workers keep retrying; a runner's threads finish their clients) is ended with exit code
    128 + the signal's number, without its :mod:`atexit` handlers: the watchdog then ends what it left (a
    temporary server, a local cluster). A signal this process ignores stays ignored. Prefect's own SIGTERM
    handler, which its flow engine installs while a flow runs, starts the same countdown. Once started, the
    countdown runs on after the block: it bounds the process's exit (atexit handlers, runner threads) too.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    from prefect.utilities import engine

    def countdown_then(handler: Callable[..., Any]) -> Callable[[int, FrameType | None], Any]:
        def on_signal(number: int, frame: FrameType | None) -> Any:
            _start_deadline(number, grace_s)
            return handler(number, frame)

        on_signal._countdown = True  # type: ignore[attr-defined]
        return on_signal

    saved = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
    for number, handler in saved.items():
        if handler is signal.SIG_IGN or handler is None or getattr(handler, "_countdown", False):
            continue
        signal.signal(number, countdown_then(_default_action if handler is signal.SIG_DFL else handler))
    prefect_handler = engine._prefect_sigterm_handler
    if not getattr(prefect_handler, "_countdown", False):
        engine._prefect_sigterm_handler = countdown_then(prefect_handler)  # type: ignore[assignment]
    try:
        yield
    finally:
        for number, handler in saved.items():
            if signal.getsignal(number) is not handler and handler is not None:
                signal.signal(number, handler)
        engine._prefect_sigterm_handler = prefect_handler  # type: ignore[assignment]


def _default_action(number: int, frame: FrameType | None) -> None:
    """What the signal does by default (SIGTERM: end the process at once; the watchdog cleans up)."""
    signal.signal(number, signal.SIG_DFL)
    os.kill(os.getpid(), number)


def _start_deadline(number: int, grace_s: float) -> None:
    """End this process ``grace_s`` from now unless it has exited (once: later signals keep the first deadline)."""
    global _deadline
    if _deadline is not None:
        return
    name = signal.Signals(number).name

    def end() -> None:
        try:
            print(f"stage: still running {grace_s:g} s after {name}; ending now (process {os.getpid()})",
                  file=sys.stderr, flush=True)
        except (OSError, ValueError):
            pass  # nobody reads the stage's stderr any more
        os._exit(128 + number)

    _deadline = threading.Timer(grace_s, end)
    _deadline.daemon = True
    try:
        _deadline.start()
    except RuntimeError:  # the interpreter is shutting down: it is exiting anyway
        pass


def prefect_api_url() -> str | None:
    """URL of the Prefect server this process uses: ``PREFECT_API_URL``, else its running temporary server."""
    url = os.environ.get("PREFECT_API_URL")
    if url:
        return url
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    return server.api_url if server.running and server.port is not None else None
