"""check stage: validate the whole params file before any stage's outputs are touched.

DVC removes a stale stage's outputs before it runs the stage's command, so a params file with a bad value, or one
that lost a section a stage reads, used to delete the last good metrics and model and only then fail. Every stage
of ``dvc.yaml`` depends on this stage's stamp, and this stage reads every section: DVC runs it first whenever a
param changes, and stops there when the params are invalid (or a section is missing), with every finished stage's
outputs intact. The stamp's content never changes, so a valid change re-runs only the stages that read it.

``python -m flows.check [--params params.yaml] [--out data/params.ok]``; no Prefect flow (it takes a second).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from flows import stage

#: The stamp's fixed content: what depends on it must not change when a param does.
STAMP = "params.yaml checked by fedcore.config (this file's content never changes)\n"


def _main(
    params: stage.ParamsFile = stage.PARAMS_FILE,
    out: Annotated[Path, typer.Option(metavar="FILE", help="the stamp written when the params are "
                                                           "valid")] = Path("data/params.ok"),
) -> int:
    from fedcore.errors import ConfigError
    from tasks.common import read_params, write_text

    try:
        read_params(params)
    except ConfigError as error:
        print(f"error: invalid params ({params}); no stage was run and no output was removed:\n{error}",
              file=sys.stderr)
        return 2
    write_text(out, STAMP)
    return 0


main = stage.command(__doc__, _main, prefect=False)
"""Command-line entry point (``python -m flows.check``)."""

if __name__ == "__main__":
    raise SystemExit(main())
