"""Progress bars on a terminal's stderr (loading, downloads); silent when stderr is redirected."""

from __future__ import annotations

import sys
from collections.abc import Callable

Progress = Callable[[int, int], None]  # (done, total)
MIB = 1 << 20


def terminal_bar(label: str, *, in_bytes: bool = False) -> Progress | None:
    """A one-line bar redrawn in place on stderr, or None when stderr is not a terminal (logs and
    pipes get no carriage-return noise). `in_bytes` shows the counts in MiB."""
    if not sys.stderr.isatty():
        return None
    shown = [-1]  # the last percent drawn: redraw only when it changes

    def show(done: int, total: int) -> None:
        width = 30
        percent = 100 * done // max(total, 1)
        if percent == shown[0] and done < total:
            return
        shown[0] = percent
        filled = width * done // max(total, 1)
        bar = "#" * filled + "-" * (width - filled)
        counts = f"{done / MIB:.1f}/{total / MIB:.1f} MiB" if in_bytes else f"{done}/{total}"
        end = "\n" if done >= total else ""
        print(f"\r{label} [{bar}] {counts}", end=end, file=sys.stderr, flush=True)

    return show
