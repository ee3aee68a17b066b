"""Files the user gives dmt and files dmt gives back, handled so that nothing the user owns is lost.

- Outputs are written aside and renamed into place (:func:`atomic_file`, :func:`write_directory`): a crash
  or a full disk leaves the previous file or directory as it was, never half of one.
- A directory output replaces only its own kind of output (a previous export, a previous store); anything
  else is refused, naming it, unless the user forces it, and never the command's own inputs or the
  directory the user stands in.
- Outputs get the user's default permissions (umask), as ``open`` and ``save_pretrained`` give them.
- JSON outputs hold no ``NaN``/``Infinity`` (invalid JSON for most parsers): ``null`` instead.
- Text inputs are checked: an empty file or one that is not text is refused, naming the file.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from dmt.errors import InputFileError, OutputExistsError

# A text input is not text (a binary file, an archive) where control characters other than white space
# exceed the first share of its characters, or characters that are not UTF-8 exceed the second: text in
# another 8-bit encoding (Latin-1) stays under it.
MAX_CONTROL_SHARE = 0.01
MAX_UNDECODABLE_SHARE = 0.2
CONTROL_CHARACTERS = re.compile(r"[\x01-\x08\x0e-\x1a\x1c-\x1f\x7f]")


def default_mode(directory: bool = False) -> int:
    """The permissions ``open`` (0o666) or ``mkdir`` (0o777) would give under the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def fsync_path(path: Path) -> None:
    """Flush ``path`` (a file, or a directory's entries) to stable storage; a no-op on Windows."""
    if os.name == "nt":  # directories cannot be opened for fsync there
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# -- outputs ---------------------------------------------------------------------------------------------


@contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO[Any]]:
    """Write ``path`` through a temporary sibling that is fsynced and renamed into place on success.

    A writer killed mid-way leaves its ``.NAME.*.tmp`` sibling, which the next write of ``path`` removes.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    for leftover in target.parent.glob(f".{target.name}.*.tmp"):
        leftover.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, default_mode())  # mkstemp makes 0o600: the user's umask decides, as for open()
        with os.fdopen(fd, mode) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(target.parent)  # persist the rename itself


def finite_json(value: Any, where: str = "", nulled: list[str] | None = None) -> Any:
    """``value`` with every NaN or infinite float replaced by ``None``; their paths go to ``nulled``."""
    if isinstance(value, float) and not math.isfinite(value):
        if nulled is not None:
            nulled.append(where or "$")
        return None
    if isinstance(value, dict):
        return {k: finite_json(v, f"{where}.{k}" if where else str(k), nulled) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_json(v, f"{where}[{i}]", nulled) for i, v in enumerate(value)]
    return value


def write_json(path: str | os.PathLike, payload: Any) -> Path:
    """``payload`` as indented, strictly valid JSON at ``path`` (parents created, written atomically).

    A NaN or infinite number becomes ``null`` and its place is listed under ``"not_finite"`` (an object
    payload), so a reader learns why it is missing.
    """
    nulled: list[str] = []
    payload = finite_json(payload, nulled=nulled)
    if nulled and isinstance(payload, dict):
        payload["not_finite"] = {"paths": nulled, "why": "the value was NaN or infinite"}
    with atomic_file(path, "w") as handle:
        json.dump(payload, handle, indent=2, allow_nan=False)
    return Path(path)


def refuse_existing_file(path: str | os.PathLike, force: bool, force_hint: str = "force=true") -> None:
    """Refuse to overwrite an existing ``path`` unless ``force``; a directory there is always refused."""
    path = Path(path)
    if path.is_dir():
        raise OutputExistsError(f"{path} is a directory; name a file to write")
    if path.exists() and not force:
        raise OutputExistsError(f"{path} exists; choose another path, or pass {force_hint} to replace it")


def check_directory_target(
    target: Path,
    replaceable: Callable[[Path], bool],
    what: str,
    force: bool = False,
    keep: Collection[str | os.PathLike] = (),
    force_hint: str = "--force",
) -> None:
    """Refuse ``target`` as the place of a new ``what`` where writing it would lose the user's files.

    Refused always: a file at ``target``; a ``target`` that is, or holds, one of ``keep`` (the command's
    inputs, where they exist) or the current directory. Refused unless ``force``: a non-empty directory
    for which ``replaceable(target)`` is false (not a previous ``what``).
    """
    target = target.absolute()
    if target.exists() and not target.is_dir():
        raise OutputExistsError(f"{target} is a file, not a directory; name a directory for the {what}")
    for inside in (*(path for path in keep if Path(path).exists()), Path.cwd()):
        inside = Path(inside).absolute()
        if inside == target or target in inside.parents:
            role = "the current directory" if inside == Path.cwd().absolute() else "an input of this command"
            raise OutputExistsError(
                f"{target} holds {inside} ({role}), which writing the {what} there would delete; "
                "name another directory"
            )
    if force or not target.is_dir():
        return
    names = sorted(path.name for path in target.iterdir())
    if names and not replaceable(target):
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise OutputExistsError(
            f"{target} is not empty and is not a {what} (it holds {shown}); name another directory, "
            f"or pass {force_hint} to replace it"
        )


def follow_umask(directory: Path) -> None:
    """Give ``directory`` and everything in it the permissions of the user's umask (some writers, such as
    safetensors, create files readable by their owner alone)."""
    file_mode, directory_mode = default_mode(), default_mode(directory=True)
    directory.chmod(directory_mode)
    for path in directory.rglob("*"):
        path.chmod(directory_mode if path.is_dir() else file_mode)


def write_directory(target: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Atomically make ``target`` a directory holding what ``write(directory)`` puts in an empty one.

    Check the target first with :func:`check_directory_target`. ``write`` fills a fresh directory inside
    a temporary sibling of ``target`` (same file system, so renames are atomic); that directory is
    fsynced, the old ``target`` moved aside, the new one renamed into place and only then the old one
    deleted. On any failure the previous ``target`` is left (or put back) as it was and the temporary
    sibling removed. Returns the absolute ``target``.

    Raises:
        OSError: with the original error as cause and ``target`` named in the message.
    """
    target = Path(target).absolute()  # a relative "store" has the parent "." only once made absolute
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.saving-", dir=target.parent))
        try:
            new, old = staging / "new", staging / "old"
            new.mkdir()  # under the user's umask, unlike the mkdtemp staging directory
            write(new)
            follow_umask(new)
            fsync_path(new)
            if target.exists():
                os.replace(target, old)
            try:
                os.replace(new, target)
            except BaseException:
                if old.exists():
                    os.replace(old, target)
                raise
            fsync_path(target.parent)  # make the renames themselves durable
        finally:
            shutil.rmtree(staging, ignore_errors=True)  # on success this deletes the previous target
    except OSError as error:
        raise OSError(error.errno, f"saving to {target} failed: {error.strerror or error}") from error
    return target


# -- inputs ----------------------------------------------------------------------------------------------


def read_text_file(path: str | os.PathLike, fallback_encoding: str | None = None) -> str:
    """A text file's contents as UTF-8; refused, naming the file, when it is empty or not text.

    Not text: it holds NUL bytes, more than 1% of its characters are control characters other than white
    space, or more than 20% are not UTF-8. Under that share the stray bytes become U+FFFD, or, with
    ``fallback_encoding`` (``"latin-1"``), the whole file is decoded in that encoding instead.

    Raises:
        InputFileError: the file is unreadable, empty or not text.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise InputFileError(f"{path}: cannot be read ({error.strerror or error})") from error
    if not data.strip():
        raise InputFileError(f"{path}: the file is empty; give a text with words in it")
    if b"\0" in data:
        raise InputFileError(f"{path}: not a text file ({data.count(0):,} NUL bytes); give UTF-8 text")
    try:
        text = data.decode("utf-8")
        undecodable = 0.0
    except UnicodeDecodeError:
        text = data.decode("utf-8", errors="replace")
        undecodable = text.count("\ufffd") / len(text)
    controls = len(CONTROL_CHARACTERS.findall(text)) / len(text)
    if controls > MAX_CONTROL_SHARE or undecodable > MAX_UNDECODABLE_SHARE:
        raise InputFileError(
            f"{path}: not a text file ({controls:.0%} control characters, {undecodable:.0%} not UTF-8); "
            "give UTF-8 text"
        )
    return data.decode(fallback_encoding) if fallback_encoding and undecodable else text
