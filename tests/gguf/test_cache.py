"""The model cache (issue 15): atomic, locked, repairs what it finds damaged."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from metallic.gguf import cache
from metallic.gguf.cache import CacheError, cache_dir, cached_file, is_cached

CONTENT = b"GGUF" + bytes(range(256)) * 4096  # 1 MiB and a bit (the child below makes it too)
SHA = hashlib.sha256(CONTENT).hexdigest()


def write_content(out) -> None:
    for start in range(0, len(CONTENT), 100_000):
        out.write(CONTENT[start : start + 100_000])


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.delenv("METALLIC_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "metallic"
    monkeypatch.setenv("METALLIC_CACHE", str(tmp_path / "own"))
    assert cache_dir() == tmp_path / "own"
    monkeypatch.delenv("METALLIC_CACHE")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "metallic"


def test_made_once_then_trusted_by_its_stamp(monkeypatch, tmp_path: Path) -> None:
    target = tmp_path / "models" / "m.gguf"
    calls = []
    cached_file(target, SHA, lambda out: (calls.append(1), write_content(out)), "m")
    assert target.read_bytes() == CONTENT and calls == [1]
    assert is_cached(target, SHA)
    assert not list(target.parent.glob("*.part"))
    monkeypatch.setattr(cache, "sha256_file", lambda path: pytest.fail("hashed again"))
    assert cached_file(target, SHA, lambda out: pytest.fail("made again"), "m") == target


@pytest.mark.parametrize(
    "damage",
    [
        lambda path: path.write_bytes(CONTENT[: len(CONTENT) // 2]),  # a partial file
        lambda path: path.write_bytes(b"X" + CONTENT[1:]),  # same size, wrong bytes
    ],
)
def test_a_damaged_file_is_made_again(tmp_path: Path, damage) -> None:
    target = tmp_path / "m.gguf"
    cached_file(target, SHA, write_content, "m")
    damage(target)
    assert not is_cached(target, SHA)
    assert cached_file(target, SHA, write_content, "m").read_bytes() == CONTENT


def test_an_unstamped_good_file_is_kept(tmp_path: Path) -> None:
    """A file left by an earlier writer without a stamp is hashed once, not fetched again."""
    target = tmp_path / "m.gguf"
    target.write_bytes(CONTENT)
    assert cached_file(target, SHA, lambda out: pytest.fail("made again"), "m") == target
    assert is_cached(target, SHA)


def test_bad_bytes_never_reach_the_name(tmp_path: Path) -> None:
    target = tmp_path / "m.gguf"
    with pytest.raises(CacheError, match="not the expected") as err:
        cached_file(target, SHA, lambda out: out.write(b"wrong"), "model m")
    assert "model m" in str(err.value) and "\n" not in str(err.value)
    assert not target.exists() and not list(tmp_path.glob(".m.gguf.*.part"))


def test_a_failed_writer_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "m.gguf"

    def broken(out) -> None:
        out.write(CONTENT[:1000])
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cached_file(target, SHA, broken, "m")
    assert not target.exists() and not list(tmp_path.glob("*.part"))


def test_stale_parts_of_a_killed_writer_are_removed(tmp_path: Path) -> None:
    stale = tmp_path / ".m.gguf.abc123.part"
    stale.write_bytes(b"half")
    cached_file(tmp_path / "m.gguf", SHA, write_content, "m")
    assert not stale.exists()


def test_an_unwritable_folder_is_one_line(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(CacheError, match="cannot write m to"):
        cached_file(blocker / "m.gguf", SHA, write_content, "m")


def test_concurrent_first_runs_wait_for_one_writer(tmp_path: Path) -> None:
    """Two processes at once: one writes (slowly), the other waits on the lock and then finds
    the finished file. Both return it; it was written once."""
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        from metallic.gguf.cache import cached_file
        content = b"GGUF" + bytes(range(256)) * 4096
        def slow(out):
            with open({str(tmp_path / "writes")!r}, "a") as log:
                log.write("w")
            for start in range(0, len(content), 65536):
                out.write(content[start:start + 65536])
                time.sleep(0.02)
        path = cached_file(Path({str(tmp_path / "m.gguf")!r}), {SHA!r}, slow, "m")
        print(path.read_bytes() == content)
        """
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=120)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert outputs == ["True", "True"]
    assert (tmp_path / "writes").read_text() == "w"
