"""Progress bars for long work: on stderr when it is a terminal, silent in logs and with ``TQDM_DISABLE=1``
(what the commands' ``--quiet`` / ``quiet=true`` set, so that the libraries' own tqdm bars go quiet too)."""

from __future__ import annotations

import os

from tqdm.auto import tqdm


def quiet() -> bool:
    """Whether the user asked for no progress bars (``TQDM_DISABLE``, tqdm's own switch)."""
    return os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true", "yes")


def set_quiet() -> None:
    """Silence every progress bar of this process, dmt's and the libraries' alike."""
    os.environ["TQDM_DISABLE"] = "1"


def progress_bar(total: int | None, desc: str, unit: str = "tok") -> tqdm:
    """A bar over ``total`` units (None: not known ahead) with rate and ETA; ``disable=None`` hides it when
    stderr is no terminal."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=True,
        dynamic_ncols=True,
        leave=False,
        disable=True if quiet() else None,
    )
