"""minisail/allocator.py: THP_MEM_ALLOC_ENABLE=1 is set only before torch is imported, only where transparent huge
pages are on, and never over the user's own setting; the benchmark's peers do not inherit it."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from minisail import allocator


@pytest.fixture
def no_setting(monkeypatch):
    monkeypatch.delenv(allocator.VARIABLE, raising=False)
    monkeypatch.delitem(sys.modules, "torch")  # as if torch were not imported yet (restored afterwards)
    monkeypatch.setattr(sys, "platform", "linux")


def test_set_before_torch_where_huge_pages_are_on(no_setting, monkeypatch, tmp_path):
    setting = tmp_path / "enabled"
    setting.write_text("always [madvise] never\n")
    monkeypatch.setattr(allocator, "THP_SETTING", setting)
    assert allocator.ask_torch_for_huge_pages().startswith(f"{allocator.VARIABLE}=1:")
    assert os.environ[allocator.VARIABLE] == "1"


@pytest.mark.parametrize("text", ["always madvise [never]\n", None])
def test_left_alone_where_huge_pages_are_off_or_missing(no_setting, monkeypatch, tmp_path, text):
    setting = tmp_path / "enabled"
    if text is not None:
        setting.write_text(text)
    monkeypatch.setattr(allocator, "THP_SETTING", setting)
    assert "off here" in allocator.ask_torch_for_huge_pages()
    assert allocator.VARIABLE not in os.environ


def test_the_users_setting_wins(no_setting, monkeypatch):
    monkeypatch.setenv(allocator.VARIABLE, "0")
    assert "already set" in allocator.ask_torch_for_huge_pages()
    assert os.environ[allocator.VARIABLE] == "0"


def test_too_late_once_torch_is_imported(monkeypatch):
    import torch  # noqa: F401

    monkeypatch.delenv(allocator.VARIABLE, raising=False)
    assert "imported before minisail" in allocator.ask_torch_for_huge_pages()
    assert allocator.VARIABLE not in os.environ


def run(code: str) -> str:
    environment = {key: value for key, value in os.environ.items() if key != allocator.VARIABLE}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment, check=True
    ).stdout.strip()


def test_importing_minisail_first_sets_it_for_torch():
    on = "[never]" not in (allocator.THP_SETTING.read_text() if allocator.THP_SETTING.exists() else "[never]")
    expected = "1" if on and sys.platform.startswith("linux") else "None"
    assert run("import os, minisail; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))") == expected
    assert run("import os, torch, minisail; print(os.environ.get('THP_MEM_ALLOC_ENABLE'))") == "None"


def test_benchmark_peers_do_not_inherit_minisails_setting(monkeypatch):
    from bench.processes import worker_environment

    monkeypatch.setenv(allocator.VARIABLE, "1")
    monkeypatch.setattr(allocator, "decision", f"{allocator.VARIABLE}=1: set by minisail")
    assert worker_environment("minisail")[allocator.VARIABLE] == "1"
    assert allocator.VARIABLE not in worker_environment("transformers")
    monkeypatch.setattr(allocator, "decision", f"{allocator.VARIABLE}=1 already set (by the user)")
    assert worker_environment("llama.cpp")[allocator.VARIABLE] == "1"
