"""The benchmark's checkpoints: random weights at a preset's real shapes, written once in the official layout.

    <cache>/<preset>-v<FORMAT>/official/       config.json, model-0000k-of-0000n.safetensors, the index (bf16)
    <cache>/<preset>-v<FORMAT>/transformers/   the same weights converted to transformers' native names
    <cache>/<preset>-v<FORMAT>/gguf-<TYPE>/    the language model as a GGUF for llama.cpp (gguf_export.py)

The official folder is what a user downloads (bf16, sharded, official key names), written through the family's
weight map (bench/shard_writer.py, one shard at a time: an 8B model is written in about one shard's memory), so
loading it exercises exactly the path of a real checkpoint. Weights are seeded: every run of a format version
benchmarks the same numbers.

Cache policy (the folders are large: 4 GB per copy for SAIL-VL-2B, 11 GB for InternViT-6B):
- default folder ~/.cache/minisail/bench (`--cache DIR` to move it); `--clean` deletes only our entries in it;
- a folder is complete once its COMPLETE marker exists: it is built under a temporary name and renamed, so an
  interrupted run never leaves a half-written checkpoint that a later run would trust;
- entries of other format versions and temporary folders of dead runs are deleted when the bench starts;
- before writing, the free disk space is checked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from pathlib import Path

from bench.models import build_on_meta
from bench.presets import PRESETS, Preset
from bench.shard_writer import write_official
from minisail.errors import MinisailError

FORMAT = 2  # bump when the written checkpoints change: older entries are then deleted
DEFAULT_CACHE = Path.home() / ".cache" / "minisail" / "bench"
ENTRY = re.compile(r"(?P<preset>[a-z0-9.-]+)-v(?P<version>\d+)")
PARTIAL = re.compile(r"\.(?P<kind>official|transformers|gguf-[A-Z0-9_]+)\.partial-(?P<pid>\d+)")
KIND = re.compile(r"official|transformers|gguf-[A-Z0-9_]+")  # the folders an entry holds


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def entry_folder(cache: Path, preset: Preset) -> Path:
    return Path(cache) / f"{preset.name}-v{FORMAT}"


def is_complete(folder: Path) -> bool:
    return (folder / "COMPLETE").is_file()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tidy_cache(cache: Path) -> None:
    """Delete entries of other format versions and the partial folders of runs that died."""
    cache = Path(cache)
    if not cache.is_dir():
        return
    for entry in cache.iterdir():
        match = ENTRY.fullmatch(entry.name)
        if not match or not entry.is_dir():
            continue
        if match["preset"] in PRESETS and int(match["version"]) != FORMAT:
            log(f"removing {entry} (written by another version of the benchmark)")
            shutil.rmtree(entry, ignore_errors=True)
            continue
        for part in entry.iterdir():
            partial = PARTIAL.fullmatch(part.name)
            if partial and not _pid_alive(int(partial["pid"])):
                log(f"removing {part} (left by an interrupted run)")
                shutil.rmtree(part, ignore_errors=True)


def clean_cache(cache: Path, presets=None) -> list[Path]:
    """Delete the benchmark's entries under `cache` and nothing else; return what was removed. An entry is a folder
    `<preset>-v<N>` of a known preset (of `presets`, if given) that holds only what the benchmark writes (official/,
    transformers/, gguf-<TYPE>/, partial folders): a folder of the same shape of name with anything else in it is
    someone else's and is left alone."""
    cache, removed = Path(cache), []
    if cache.is_dir():
        for entry in cache.iterdir():
            match = ENTRY.fullmatch(entry.name)
            if not match or not entry.is_dir() or match["preset"] not in (presets or PRESETS):
                continue
            if not all(_written_by_the_bench(part) for part in entry.iterdir()):
                log(f"left {entry} alone: it holds files the benchmark does not write")
                continue
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _written_by_the_bench(part: Path) -> bool:
    return part.is_dir() and (KIND.fullmatch(part.name) is not None or PARTIAL.fullmatch(part.name) is not None)


def _check_disk(folder: Path, needed: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if free < needed * 1.05:
        raise MinisailError(
            f"the benchmark needs {needed / 1e9:.1f} GB of disk in {folder} for its checkpoint and {free / 1e9:.1f} GB "
            "are free: free some space, or point --cache at a bigger disk"
        )


def parameter_count(preset: Preset) -> int:
    model, _ = build_on_meta(preset)
    return sum(p.numel() for p in model.state_dict().values())


def _build(folder: Path, kind: str, write) -> Path:
    """Run `write(tmp)` into a temporary sibling, mark it complete and rename it into place."""
    final = folder / kind
    if is_complete(final):
        return final
    shutil.rmtree(final, ignore_errors=True)
    tmp = folder / f".{kind}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        write(tmp)
        for file in tmp.iterdir():  # on disk before we call it complete
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        (tmp / "COMPLETE").write_text(json.dumps({"format": FORMAT}))
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def ensure_checkpoints(preset: Preset, cache: Path, *, transformers: bool) -> dict[str, Path]:
    """The preset's official (and, if asked, transformers-layout) checkpoint folders, written if missing."""
    tidy_cache(cache)
    folder = entry_folder(cache, preset)
    official_bytes = parameter_count(preset) * 2
    kinds = ["official", "transformers"] if transformers else ["official"]
    missing = [kind for kind in kinds if not is_complete(folder / kind)]
    if missing:
        _check_disk(folder, official_bytes * len(missing))
    folders = {}
    if not is_complete(folder / "official"):
        log(f"writing random bf16 weights for {preset.name} ({official_bytes / 1e9:.1f} GB) to {folder / 'official'}")
    folders["minisail"] = _build(folder, "official", lambda tmp: write_official(preset, tmp, progress=log))
    if transformers:
        from bench.hf_side import write_transformers_checkpoint

        if not is_complete(folder / "transformers"):
            log(f"converting them to transformers' layout in {folder / 'transformers'}")
        folders["transformers"] = _build(
            folder, "transformers", lambda tmp: write_transformers_checkpoint(preset, folders["minisail"], tmp)
        )
    return folders


def evict_page_cache(folder: Path) -> None:
    """Drop the folder's files from the OS page cache, so the next load reads the disk (a cold load)."""
    if not hasattr(os, "posix_fadvise"):
        return
    for file in Path(folder).iterdir():
        if file.is_file():
            fd = os.open(file, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
