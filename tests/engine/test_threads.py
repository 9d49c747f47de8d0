"""torch's CPU thread count chosen at engine start from the usable cores."""

from __future__ import annotations

import pytest
import torch

from tokenmill.engine import threads


def test_cgroup_v2_quota(tmp_path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) is None


def test_cgroup_v1_quota(tmp_path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_cpu_limit(tmp_path) == 3.0
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads.cgroup_cpu_limit(tmp_path) is None
    assert threads.cgroup_cpu_limit(tmp_path / "absent") is None


def test_quota_caps_the_affinity_mask(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(threads, "affinity_cores", lambda: 8)
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    cores, source = threads.usable_cores(tmp_path)
    assert cores == 2 and "quota 2.5" in source
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert threads.usable_cores(tmp_path)[0] == 1  # never 0
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.usable_cores(tmp_path)[0] == 8


def test_choice_order(monkeypatch) -> None:
    monkeypatch.setattr(threads, "usable_cores", lambda: (3, "usable cores (3 in the affinity mask)"))
    assert threads.choose_num_threads(5, {"OMP_NUM_THREADS": "1"}) == threads.ThreadChoice(5, "engine argument")
    assert threads.choose_num_threads(None, {"OMP_NUM_THREADS": "2"}).num_threads == 2
    assert threads.choose_num_threads(None, {"OMP_NUM_THREADS": "junk"}).num_threads == 3
    assert threads.choose_num_threads(None, {}).num_threads == 3
    with pytest.raises(ValueError, match="num_threads=0 is invalid"):
        threads.choose_num_threads(0, {})


def test_engine_sets_and_logs_threads(caplog) -> None:
    from tests.engine.helpers import tiny_pair
    from tokenmill.engine.llm import LLM

    before = torch.get_num_threads()
    loaded, _ = tiny_pair("llama")
    try:
        with caplog.at_level("INFO", logger="tokenmill.engine.threads"):
            LLM(loaded=loaded, num_threads=1)
        assert torch.get_num_threads() == 1
        assert "torch CPU threads: 1 (engine argument)" in caplog.text
    finally:
        torch.set_num_threads(before)
