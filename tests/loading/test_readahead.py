"""The loader's background read-ahead (minisail/fast/readahead.py): it reads the files, stops when asked,
stays off when the files would not fit, and a load with it gives the same model as one without."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from helpers.checkpoints import GOLDEN

import minisail
from minisail.fast import readahead
from minisail.fast.readahead import ReadAhead


def test_reads_every_file_to_the_end(tmp_path, monkeypatch):
    paths = [tmp_path / "a", tmp_path / "b"]
    paths[0].write_bytes(b"x" * (3 * readahead.CHUNK + 5))
    paths[1].write_bytes(b"y" * 7)
    sizes = []
    real_open = open

    def counting_open(path, *args, **kwargs):
        f = real_open(path, *args, **kwargs)
        if path not in paths:  # /proc/meminfo
            return f
        readinto = f.readinto

        class Counted:
            def readinto(self, buffer):
                n = readinto(buffer)
                sizes.append((path, n))
                return n

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

        return Counted()

    monkeypatch.setattr(readahead, "open", counting_open, raising=False)
    ahead = ReadAhead(paths)
    assert ahead.active
    ahead.wait()
    read = {p: sum(n for q, n in sizes if q == p) for p in paths}
    assert read == {paths[0]: 3 * readahead.CHUNK + 5, paths[1]: 7}


def test_off_when_the_files_would_not_fit(tmp_path, monkeypatch):
    path = tmp_path / "big"
    path.write_bytes(b"z" * 1000)
    monkeypatch.setattr(readahead, "available_memory_bytes", lambda: 1500)  # half of it: 750 < 1000
    assert not ReadAhead([path]).active
    monkeypatch.setattr(readahead, "available_memory_bytes", lambda: None)  # unknown: do not guess
    assert not ReadAhead([path]).active
    monkeypatch.setattr(readahead, "available_memory_bytes", lambda: 10_000)
    ahead = ReadAhead([path])
    assert ahead.active
    ahead.stop()
    assert not ahead.thread.is_alive()


def test_stop_ends_a_long_read(tmp_path, monkeypatch):
    path = tmp_path / "f"
    path.write_bytes(b"w" * (4 * readahead.CHUNK))
    gate = threading.Event()
    real_open = open

    def slow_open(p, *args, **kwargs):
        if p == path:
            gate.wait()  # the reader waits until stop() has been asked for
        return real_open(p, *args, **kwargs)

    monkeypatch.setattr(readahead, "open", slow_open, raising=False)
    ahead = ReadAhead([path])
    ahead._stop.set()
    gate.set()
    ahead.wait()
    assert not ahead.thread.is_alive()


def started(monkeypatch) -> list[ReadAhead]:
    """Every ReadAhead the loader starts, from now on."""
    made = []

    class Recorded(ReadAhead):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(readahead, "ReadAhead", Recorded)
    return made


def test_a_failed_load_stops_its_reader(tmp_path, monkeypatch):
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for f in (GOLDEN / "internvl-qwen2-tiny" / "checkpoint").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    config = json.loads((folder / "config.json").read_text())
    config["llm_config"]["intermediate_size"] -= 1  # found only while filling (layer counts fail before the reader)
    (folder / "config.json").write_text(json.dumps(config))
    made = started(monkeypatch)
    with pytest.raises(minisail.MinisailError, match="the config does not match the weights"):
        minisail.load(folder)
    assert len(made) == 1 and made[0].active and made[0]._stop.is_set() and not made[0].thread.is_alive()


def test_kept_on_only_while_the_model_holds_views(monkeypatch, views_of_any_size):
    folder = GOLDEN / "internvl-qwen2-tiny" / "checkpoint"  # float32 on disk
    made = started(monkeypatch)
    minisail.load(folder)  # float32: zero-copy views, the read-ahead runs to the end of the files
    minisail.load(folder, dtype=torch.bfloat16)  # every tensor converted: nothing left to read ahead for
    assert [r._stop.is_set() for r in made] == [False, True]


def test_same_weights_with_and_without(monkeypatch):
    folder = GOLDEN / "internvl-qwen2-tiny" / "checkpoint"
    with_it = minisail.load(folder).state_dict()
    monkeypatch.setattr(readahead, "available_memory_bytes", lambda: None)
    without = minisail.load(folder).state_dict()
    assert set(with_it) == set(without) and all(torch.equal(with_it[k], without[k]) for k in with_it)


def test_a_tensor_parallel_rank_reads_no_whole_file_ahead(tmp_path, monkeypatch):
    from minisail.parallel.plan import ShardedTensors

    path = tmp_path / "weights"
    path.write_bytes(b"w" * 1000)
    monkeypatch.setattr(readahead, "available_memory_bytes", lambda: 10_000)

    class Files:
        description = "weights"

        def paths(self):
            return [path]

    whole = readahead.BackgroundReadAhead()
    whole.prepare(None, Files())
    assert whole.reader.active  # one process: the files are read ahead
    whole.reader.stop()
    rank = readahead.BackgroundReadAhead()
    rank.prepare(None, ShardedTensors(Files(), {}, 0, 2))
    assert not rank.reader.active  # a rank reads only its slices: reading every file whole would be N times that
