"""Usable cores and native bf16, read from cgroup files and CPU flags like a container's."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from storyreel.cpu import cgroup_cpu_limit, cpu_flags, native_bf16, torch_threads, usable_cpus


def cgroup(tmp_path: Path, v2: str | None = None, v1: tuple[str, str] | None = None) -> Path:
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(v1[0] + "\n")
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(v1[1] + "\n")
    return tmp_path


@pytest.mark.parametrize(
    ("v2", "v1", "limit"),
    [
        ("max 100000", None, None),
        ("250000 100000", None, 2.5),
        ("50000 100000", None, 0.5),
        (None, ("-1", "100000"), None),
        (None, ("300000", "100000"), 3.0),
        (None, None, None),
        ("garbage", None, None),
    ],
)
def test_the_cgroup_quota_is_read_from_v2_or_v1(tmp_path, v2, v1, limit):
    assert cgroup_cpu_limit(cgroup(tmp_path, v2, v1)) == limit


def test_usable_cpus_is_the_affinity_capped_by_the_quota_rounded_up(tmp_path):
    cores = len(os.sched_getaffinity(0))
    assert usable_cpus(cgroup(_mk(tmp_path / "a"), "max 100000")) == cores
    assert usable_cpus(cgroup(_mk(tmp_path / "b"), "50000 100000")) == 1
    assert usable_cpus(cgroup(_mk(tmp_path / "c"), f"{cores * 100000 + 1} 100000")) == cores


def _mk(path: Path) -> Path:
    path.mkdir()
    return path


def test_torch_threads_keeps_a_set_count_and_fills_in_zero():
    assert torch_threads(3) == 3
    assert torch_threads(0) == usable_cpus()


def test_bf16_is_native_only_with_the_bf16_instructions(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n")
    assert "avx512_bf16" in cpu_flags(cpuinfo)
    assert native_bf16(frozenset({"avx512f", "amx_bf16"}))
    assert native_bf16(frozenset({"avx512_bf16"}))
    assert not native_bf16(frozenset({"avx2", "avx512f"}))
    assert cpu_flags(tmp_path / "missing") == frozenset()
