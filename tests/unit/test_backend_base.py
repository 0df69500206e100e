from __future__ import annotations

from pathlib import Path

import pytest

from backends.base import StopMatcher, Utf8StreamDecoder, resolve_threads


def test_utf8_decoder_holds_split_characters() -> None:
    data = "é🙂".encode()
    d = Utf8StreamDecoder()
    out = [d.feed(data[i : i + 1]) for i in range(len(data))]
    assert out == ["", "é", "", "", "", "🙂"]
    assert d.flush() == ""


def test_utf8_decoder_flushes_invalid_tail_as_replacement() -> None:
    d = Utf8StreamDecoder()
    assert d.feed(b"a\xf0\x9f") == "a"
    assert d.flush() == "\ufffd"


def test_stop_matcher_never_leaks_a_split_stop_string() -> None:
    m = StopMatcher(["</end>"])
    emitted = []
    for piece in ["Hello </", "en", "d> tail"]:
        text, stopped = m.feed(piece)
        emitted.append(text)
        if stopped:
            break
    assert "".join(emitted) == "Hello "
    assert stopped


def test_stop_matcher_releases_false_alarm() -> None:
    m = StopMatcher(["STOP"])
    assert m.feed("ST") == ("", False)
    assert m.feed("ART") == ("START", False)
    assert m.feed("S") == ("", False)
    assert m.flush() == "S"


def write(root: Path, rel: str, text: str) -> None:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)


def test_resolve_threads_auto_counts_physical_cores_and_quota(tmp_path: Path) -> None:
    # 4 logical CPUs = 2 cores x 2 SMT threads; cgroup quota of 1.5 CPUs
    for cpu, sib in [(0, "0,2"), (1, "1,3"), (2, "0,2"), (3, "1,3")]:
        write(tmp_path, f"sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list", sib)
    n, how = resolve_threads("auto", tmp_path)
    assert n == 2 and "physical=2" in how
    write(tmp_path, "sys/fs/cgroup/cpu.max", "150000 100000")
    n, how = resolve_threads("auto", tmp_path)
    assert n == 2 and "cgroup_quota=2" in how
    write(tmp_path, "sys/fs/cgroup/cpu.max", "50000 100000")
    assert resolve_threads(None, tmp_path)[0] == 1
    write(tmp_path, "sys/fs/cgroup/cpu.max", "max 100000")
    assert resolve_threads("auto", tmp_path)[0] == 2


def test_offline_cpus_are_not_counted(tmp_path: Path) -> None:
    write(tmp_path, "sys/devices/system/cpu/cpu0/topology/thread_siblings_list", "0")
    write(tmp_path, "sys/devices/system/cpu/cpu1/topology/thread_siblings_list", "1")
    write(tmp_path, "sys/devices/system/cpu/cpu1/online", "0")
    assert resolve_threads("auto", tmp_path)[0] == 1


@pytest.mark.parametrize("bad", [0, -1, "zero", "1.5"])
def test_resolve_threads_rejects_bad_values(bad: object) -> None:
    with pytest.raises(ValueError):
        resolve_threads(bad)  # type: ignore[arg-type]


def test_explicit_threads() -> None:
    assert resolve_threads("3") == (3, "configured")
