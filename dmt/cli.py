"""What every dmt command does the same way: its name as the user typed it, and one way to fail.

A mistake of the user's (:class:`dmt.errors.DmtError`, or an ``OSError`` on a file they named) ends the
command with one line, ``<command>: error: <what and where>``, and exit status 2; no traceback. The full
traceback stays one switch away for us: ``--debug`` on the argparse commands, ``HYDRA_FULL_ERROR=1`` on the
Hydra apps (Hydra's own convention). A Hydra app that fails this way also removes the run directory Hydra
made for it, when nothing but Hydra's own files is in it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from dmt.errors import DmtError

T = TypeVar("T")
USER_ERROR_STATUS = 2  # argparse's status for a bad command line
INTERRUPTED_STATUS = 130  # 128 + SIGINT, as a shell reports it


def command_name(module: str, script: str) -> str:
    """The command as the user typed it: the console script (``dmt-export``), a script of the checkout
    (``python distill.py``), or the module (``python -m dmt.export``)."""
    argv0 = Path(sys.argv[0])
    if argv0.name == script:
        return script
    if argv0.suffix == ".py" and Path(__file__).resolve().parent not in argv0.resolve().parents:
        return f"python {sys.argv[0]}"
    return f"python -m {module}"


def pack_command(module: str, script: str, doc: str, example: str) -> tuple[str, argparse.ArgumentParser]:
    """The name of a command on a memory pack and its parser: the ``example`` (``{prog}`` filled in) and
    the first line of its ``doc`` as description, the ``pack`` argument and ``--debug``."""
    prog = command_name(module, script)
    parser = argparse.ArgumentParser(
        prog=prog,
        description=f"{example.format(prog=prog)}\n\n{doc.splitlines()[0]}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("pack", help="memory pack directory (dmt-memorize's output)")
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return prog, parser


def describe(error: BaseException) -> str:
    """The one line a user reads: an ``OSError``'s file and reason, anything else its message."""
    if isinstance(error, OSError) and error.filename is not None and error.strerror:
        return f"{error.filename}: {error.strerror}"
    return str(error)


@contextmanager
def user_errors(prog: str, debug: bool = False) -> Iterator[None]:
    """Within the block, a user's mistake ends the process with ``prog: error: ...`` (status 2), Ctrl-C
    with ``prog: interrupted`` (status 130); with ``debug`` both keep their tracebacks."""
    try:
        yield
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{prog}: interrupted", file=sys.stderr)
        raise SystemExit(INTERRUPTED_STATUS) from None
    except (DmtError, OSError) as error:
        if debug:
            raise
        print(f"{prog}: error: {describe(error)}", file=sys.stderr)
        raise SystemExit(USER_ERROR_STATUS) from None


def remove_unused_run_directory(run_dir: Path) -> None:
    """Delete ``run_dir`` if all it holds is what Hydra wrote before the task ran (``.hydra/`` and an
    empty job log), then its parents that this left empty, up to the current directory."""
    run_dir = run_dir.absolute()
    hydra_files = run_dir / ".hydra"
    if not run_dir.is_dir():
        return
    for path in run_dir.iterdir():
        if not (path == hydra_files or (path.suffix == ".log" and path.stat().st_size == 0)):
            return  # the task wrote something, or the directory held the user's files
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (hydra_files / name).unlink(missing_ok=True)
    for log in run_dir.glob("*.log"):
        log.unlink()
    cwd = Path.cwd().absolute()
    for directory in (hydra_files, run_dir, *run_dir.parents):
        if directory.exists():
            if directory == cwd or cwd.is_relative_to(directory) or any(directory.iterdir()):
                return
            directory.rmdir()


def run_hydra_task(task: Callable[..., T], cfg: object, module: str, script: str) -> T:
    """``task(cfg)`` inside a Hydra app, failing the dmt way (module docstring)."""
    from hydra.core.hydra_config import HydraConfig

    debug = os.environ.get("HYDRA_FULL_ERROR") == "1"
    try:
        with user_errors(command_name(module, script), debug):
            return task(cfg)
    except SystemExit as exit:
        if exit.code and HydraConfig.initialized():
            remove_unused_run_directory(Path(HydraConfig.get().runtime.output_dir))
        raise
