"""Progress bars: drawn in place on a terminal's stderr, absent when stderr is redirected."""

from __future__ import annotations

import io
import sys

from metallic.progress import terminal_bar


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_bar_when_stderr_is_not_a_terminal(monkeypatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert terminal_bar("loading") is None


def test_bar_redraws_in_place_and_ends_with_a_newline(monkeypatch) -> None:
    screen = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", screen)
    bar = terminal_bar("fetching model", in_bytes=True)
    assert bar is not None
    total = 10 << 20
    for done in range(0, total + 1, 1 << 18):  # 41 calls, 40 distinct percents
        bar(done, total)
    frames = screen.getvalue().split("\r")[1:]
    assert len(frames) == 41  # redrawn only when the percentage changes
    assert frames[0].startswith("fetching model [" + "-" * 30 + "] 0.0/10.0 MiB")
    assert frames[-1] == "fetching model [" + "#" * 30 + "] 10.0/10.0 MiB\n"
    assert all("\n" not in frame for frame in frames[:-1])
