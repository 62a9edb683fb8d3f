"""Domain errors of fedcore.

Exception tree::

    FedcoreError
    ├── ConfigError          invalid params (one message lists every problem)
    ├── DataError            data that cannot be used as asked
    │   ├── DownloadError    a URL or mirror that cannot be fetched
    │   ├── ChecksumError    a file whose sha256 differs from the expected one
    │   ├── UnsafeArchiveError  an archive member that would land outside the target folder
    │   └── AudioError       one audio file that cannot be read (skipped and reported by ingest)
    ├── CheckpointError      checkpoints from which no run can resume (none verifies)
    │   └── ClientStateError  one client's stored state file that is damaged
    ├── PartitionError       a partition that cannot satisfy its constraints
    └── AggregationError     client updates that cannot be combined
        └── QuorumError      too few accepted updates in a round (the round is not applied)
"""

from __future__ import annotations


class FedcoreError(Exception):
    """Base class of every fedcore error."""


class ConfigError(FedcoreError, ValueError):
    """Invalid parameters; the message lists every problem found."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        if len(self.problems) == 1:
            message = self.problems[0]
        else:
            lines = "\n".join(f"  - {p}" for p in self.problems)
            message = f"{len(self.problems)} problems in the params:\n{lines}"
        super().__init__(message)


class DataError(FedcoreError):
    """Data that cannot be used as asked."""


class DownloadError(DataError):
    """A URL or mirror that cannot be fetched."""


class ChecksumError(DataError):
    """A downloaded file whose sha256 differs from the expected one."""


class UnsafeArchiveError(DataError):
    """An archive member that would be written outside the extraction folder."""


class AudioError(DataError):
    """One audio file that cannot be read."""


class CheckpointError(FedcoreError):
    """Checkpoints from which a run cannot resume; the message names the folder and the fix."""


class ClientStateError(CheckpointError, ValueError):
    """One client's stored state file that is damaged (truncated, bit-flipped, not a state file).

    Attributes
    ----------
    client : int
        The client whose state it is.
    path : str
        The damaged file.
    server_round : int
        The round the file was written at.
    reason : str
        What is wrong with it.
    """

    def __init__(self, message: str, *, client: int = -1, path: str = "", server_round: int = -1,
                 reason: str = "") -> None:  # defaults: so that the error unpickles in another process
        super().__init__(message)
        self.client = client
        self.path = path
        self.server_round = server_round
        self.reason = reason


class PartitionError(FedcoreError, ValueError):
    """A partition that cannot satisfy its constraints."""


class AggregationError(FedcoreError):
    """Client updates that cannot be combined."""


class QuorumError(AggregationError):
    """Too few clients of a round sent an acceptable update; the round is not applied.

    Attributes
    ----------
    server_round : int
        The round that failed its quorum.
    rejected : dict of int to str
        ``"client <id>: <reason>"`` per client left out.
    """

    def __init__(self, message: str, *, server_round: int = 0, rejected: dict[int, str] | None = None) -> None:
        super().__init__(message)
        self.server_round = server_round
        self.rejected = dict(rejected or {})
