"""Hostile checkpoints: minisail refuses every bad file with a CheckpointError, reads nothing outside the folder,
and accepts exactly the .safetensors files the reference `safetensors` library accepts.

- safetensors headers: a hypothesis differential test against `safetensors.safe_open` (accepted iff accepted,
  identical tensors), plus one regression test per class the fuzz campaign found.
- confinement: index shard names, Yi-VL's mm_vision_tower and fixed-name files that climb out of the folder
  (`..`, absolute, symlinks) are refused before the outside file is opened; a Hugging Face hub-cache layout
  (snapshot files linked to ../../blobs/<hash>) loads.
- .bin: stride-0 / overlapping views, deflated zip records and oversized pickles are refused.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
import zipfile
from pathlib import Path

import pytest
import torch
from helpers import paths
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import minisail
import minisail.errors
from minisail.checkpoint.files import open_checkpoint_folder
from minisail.checkpoint.safetensors_header import DTYPE_BITS
from minisail.checkpoint.safetensors_mmap import SafetensorsFile
from minisail.checkpoint.torch_bin import load_bin
from minisail.errors import CheckpointError

safetensors = pytest.importorskip("safetensors")

GOLDEN = paths.GOLDEN


# --- safetensors: the reference's rules, differentially ---------------------------------------------------------


def write_safetensors(path: Path, header: bytes, data: bytes) -> Path:
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


def reference_load(path: Path) -> dict[str, torch.Tensor] | None:
    """The tensors `safetensors.safe_open` gives, or None if it refuses the file (at open or at get_tensor)."""
    try:
        with safetensors.safe_open(str(path), "pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except Exception:  # noqa: BLE001 - any refusal by the reference counts as a refusal
        return None


def minisail_load(path: Path) -> dict[str, torch.Tensor] | None:
    try:
        file = SafetensorsFile(path)
    except CheckpointError:
        return None
    views = {name: file.view(name) for name in file.entries}
    copies = {name: file.read(name) for name in file.entries}
    for name in views:
        assert same_tensor(views[name], copies[name]), name
    return views


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    return torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


def assert_same_verdict(path: Path) -> None:
    expected, got = reference_load(path), minisail_load(path)  # minisail raises nothing but CheckpointError
    assert (got is None) == (expected is None), f"reference {'refuses' if expected is None else 'accepts'}"
    if expected is not None:
        assert expected.keys() == got.keys()
        for name in expected:
            assert same_tensor(expected[name], got[name]), name


NAMES = st.sampled_from(["a", "b", "w.0", "c", "d", "e", "f", "", "a", "__metadata__"])
DTYPES = st.sampled_from([*DTYPE_BITS, *["F32", "BF16", "U8", "I64"] * 4, "u8", "F128"])


def rarely(draw, one_in: int) -> bool:
    """True about once in `one_in` draws (hypothesis's own integers favour their bounds: too often here)."""
    return draw(st.randoms(use_true_random=False)).random() < 1 / one_in


ODD_NUMBERS = ["-0", "-1", "1.0", "1e0", "18446744073709551615", "18446744073709551616", "9" * 400, "1e400"]
ODD_NUMBERS += ["9223372036854775808", "4611686018427387904", "NaN", "Infinity", "true", '"1"', "0"]


@st.composite
def numbers(draw):
    """A small natural number, or one time in 25 a literal the reference may refuse."""
    return draw(st.sampled_from(ODD_NUMBERS)) if rarely(draw, 25) else draw(st.integers(0, 5))


def number_text(value) -> str:
    return str(value)


@st.composite
def tensor_entry(draw, begin: int):
    """(json text of one tensor entry, its end offset as written): mostly valid, often subtly broken."""
    dtype = draw(DTYPES)
    shape = draw(st.lists(numbers(), max_size=3))
    numeric = [d for d in shape if isinstance(d, int)]
    count = 1
    for d in numeric:
        count *= d
    nbytes = count * DTYPE_BITS.get(dtype, 32) // 8
    end = begin + nbytes + (draw(st.sampled_from([1, -1])) if rarely(draw, 10) else 0)
    offsets = [str(begin), str(end)]
    if rarely(draw, 10):
        offsets[draw(st.integers(0, 1))] = number_text(draw(numbers()))
    if rarely(draw, 20):
        offsets.append("0")
    dtype_text = f'{{"{dtype}": null}}' if rarely(draw, 10) else json.dumps(dtype)
    fields = [f'"dtype": {dtype_text}', f'"shape": [{", ".join(map(number_text, shape))}]']
    fields.append(f'"data_offsets": [{", ".join(offsets)}]')
    if rarely(draw, 5):
        fields.append(draw(st.sampled_from(['"x": 1', '"x": [[[]]]', '"x": {"y": 2.5}', '"x": "\\ud83d\\ude00"'])))
    if rarely(draw, 20):
        fields.append(draw(st.sampled_from(['"dtype": "U8"', '"x": NaN', '"x": "\\ud800"', '"x": -1e999'])))
    if rarely(draw, 20):
        fields.pop(draw(st.integers(0, 2)))
    if rarely(draw, 15):  # serde's array form of a struct
        return f"[{dtype_text}, [{', '.join(map(number_text, shape))}], [{', '.join(offsets)}]]", end
    return "{" + ", ".join(fields) + "}", end


@st.composite
def safetensors_file(draw):
    entries, end = [], 0
    for _ in range(draw(st.integers(0, 4))):
        name = draw(NAMES)
        text, new_end = draw(tensor_entry(draw(st.integers(0, 8)) if rarely(draw, 8) else end))
        entries.append(f"{json.dumps(name)}: {text}")
        end = new_end if isinstance(new_end, int) else end
    metadata = draw(st.sampled_from([None, '{"format": "pt"}', "null", '{"a": 1}', "[]"]))
    metadata = metadata if rarely(draw, 3) else None
    if metadata is not None:
        entries.insert(draw(st.integers(0, len(entries))), f'"__metadata__": {metadata}')
    header = "{" + ", ".join(entries) + "}"
    if rarely(draw, 5):
        header = draw(st.sampled_from([" ", "\n"])) + header + draw(st.sampled_from(["", "   ", "\x00", " x", "\r\n"]))
    data_len = max(0, end) + (draw(st.sampled_from([1, -1, -3])) if rarely(draw, 10) else 0)
    data = draw(st.binary(min_size=max(0, data_len), max_size=max(0, data_len)))
    return header.encode(), data


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(safetensors_file())
def test_safetensors_accepted_exactly_when_the_reference_accepts(file):
    header, data = file
    with tempfile.TemporaryDirectory() as tmp:
        assert_same_verdict(write_safetensors(Path(tmp) / "x.safetensors", header, data))


def entry(dtype="U8", shape=(1,), offsets=(0, 1), **extra) -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets), **extra}


def header_of(entries: dict) -> bytes:
    return json.dumps(entries).encode()


REGRESSIONS = {  # name: (header bytes, data); each class the fuzz campaign found accepted (or crashing)
    "overlap": (header_of({"a": entry(offsets=(0, 2), shape=(2,)), "b": entry(offsets=(1, 2))}), b"xy"),
    "gap": (header_of({"a": entry(offsets=(0, 1)), "b": entry(offsets=(2, 3))}), b"xyz"),
    "not from zero": (header_of({"a": entry(offsets=(1, 2))}), b"xy"),
    "trailing bytes": (header_of({"a": entry()}), b"xy"),
    "duplicate name, bad offsets": (
        b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},'
        b' "a": {"dtype": "U8", "shape": [2], "data_offsets": [1, 3]}}',
        b"xyz",
    ),
    "duplicate field": (b'{"a": {"dtype": "U8", "dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}', b"x"),
    "duplicate __metadata__": (b'{"__metadata__": {}, "__metadata__": {}}', b""),
    "float offset": (b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1.0]}}', b"x"),
    "negative dim": (b'{"a": {"dtype": "U8", "shape": [-1], "data_offsets": [0, 1]}}', b"x"),
    "minus zero": (b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [-0, 1]}}', b"x"),
    "Infinity": (b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": Infinity}}', b"x"),
    "NaN": (b'{"__metadata__": null, "a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": NaN}}', b"x"),
    "1e400": (b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": 1e400}}', b"x"),
    "5000 digits": (b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": ' + b"9" * 5000 + b"}}", b"x"),
    "deep nesting": (
        b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": ' + b"[" * 100_000 + b"}}",
        b"x",
    ),
    "nesting 128": (
        b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": ' + b"[" * 126 + b"]" * 126 + b"}}",
        b"x",
    ),
    "lone surrogate": (b'{"__metadata__": {"\\ud800": "x"}}', b""),
    "shape overflow": (header_of({"a": entry(shape=(2**64 - 1, 2, 0), offsets=(0, 0))}), b""),
    "bits overflow": (header_of({"a": entry(dtype="F32", shape=(2**62,), offsets=(0, 0))}), b""),
    "dim past int64": (header_of({"a": entry(shape=(2**63, 0), offsets=(0, 0))}), b""),
    "unknown dtype": (header_of({"a": entry(dtype="F128")}), b"x"),
    "F6 (no torch dtype)": (header_of({"a": entry(dtype="F6_E2M3", shape=(4,), offsets=(0, 3))}), b"xyz"),
    "F4 odd last dim": (header_of({"a": entry(dtype="F4", shape=(2, 1), offsets=(0, 1))}), b"x"),
    "F4 half byte": (header_of({"a": entry(dtype="F4", shape=(1,), offsets=(0, 1))}), b"x"),
    "not an object": (b"[]", b""),
    "NUL padding": (b"{}\x00", b""),
    "__metadata__ not strings": (b'{"__metadata__": {"a": 1}}', b""),
    "header past the end": (b"{}", b""),  # written with a lying length below
}
ACCEPTED = {  # and what the reference does accept, which minisail must too
    "empty": (b"{}", b""),
    "space padding": (b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}   ', b"x"),
    "dtype as a map": (b'{"a": {"dtype": {"U8": null}, "shape": [1], "data_offsets": [0, 1]}}', b"x"),
    "entry as an array": (b'{"a": ["U8", [1], [0, 1]]}', b"x"),
    "duplicate name, consistent": (b'{"a": ["U8", [1], [0, 1]], "a": ["U8", [1], [0, 1]]}', b"x"),
    "zero-size tensors share an offset": (header_of({"a": entry(shape=(0,), offsets=(0, 0)), "b": entry()}), b"x"),
    "nesting 127": (
        b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1], "x": ' + b"[" * 125 + b"]" * 125 + b"}}",
        b"x",
    ),
    "shape [2**62, 0] of F32": (header_of({"a": entry(dtype="F32", shape=(2**62, 0), offsets=(0, 0))}), b""),
    "misaligned F32": (header_of({"a": entry(), "b": entry(dtype="F32", offsets=(1, 5))}), b"x1234"),
    "F4 pairs": (header_of({"a": entry(dtype="F4", shape=(4,), offsets=(0, 2))}), b"xy"),
    "U16, C64, F8_E8M0": (
        header_of(
            {"a": entry("U16", (1,), (0, 2)), "b": entry("C64", (1,), (2, 10)), "c": entry("F8_E8M0", (1,), (10, 11))}
        ),
        b"ab" + b"01234567" + b"c",
    ),
}


@pytest.mark.parametrize("case", REGRESSIONS, ids=list(REGRESSIONS))
def test_safetensors_regressions_refused(tmp_path, case):
    header, data = REGRESSIONS[case]
    path = write_safetensors(tmp_path / "x.safetensors", header, data)
    if case == "header past the end":
        path.write_bytes(struct.pack("<Q", 1000) + header)
    assert reference_load(path) is None, "the reference accepts it: the case is wrong"
    with pytest.raises(CheckpointError, match="x.safetensors"):
        SafetensorsFile(path)


@pytest.mark.parametrize("case", ACCEPTED, ids=list(ACCEPTED))
def test_safetensors_reference_accepted_forms_accepted(tmp_path, case):
    assert_same_verdict(write_safetensors(tmp_path / "x.safetensors", *ACCEPTED[case]))
    assert minisail_load(tmp_path / "x.safetensors") is not None


# --- confinement: nothing outside the folder is opened -----------------------------------------------------------

SECRET = b"OUTSIDE-SECRET-0123456789"


@pytest.fixture
def opened(monkeypatch):
    """Every path opened through builtins.open or torch's mmap during the test, resolved."""
    import builtins

    paths, real_open, real_from_file = [], builtins.open, torch.UntypedStorage.from_file

    def spy_open(file, *args, **kwargs):
        if isinstance(file, (str, Path)):
            paths.append(Path(file).resolve())
        return real_open(file, *args, **kwargs)

    def spy_from_file(filename, *args, **kwargs):
        paths.append(Path(filename).resolve())
        return real_from_file(filename, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", spy_open)
    monkeypatch.setattr(torch.UntypedStorage, "from_file", spy_from_file)
    return paths


def outside_file(tmp_path: Path, name: str = "outside.safetensors") -> Path:
    """A valid safetensors file outside the checkpoint folder, whose bytes must never be read."""
    path = tmp_path / name
    write_safetensors(
        path, json.dumps({"secret": entry(shape=(len(SECRET),), offsets=(0, len(SECRET)))}).encode(), SECRET
    )
    return path


def golden_copy(tmp_path: Path, case: str) -> Path:
    folder = tmp_path / "ckpt"
    shutil.copytree(GOLDEN / case / "checkpoint", folder)
    return folder


def refused_unopened(opened: list, outside: Path, load, match: str) -> None:
    with pytest.raises(CheckpointError, match=match) as error:
        load()
    assert outside.resolve() not in opened, "the outside file was opened"
    assert SECRET.decode() not in str(error.value)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "symlinked folder"])
def test_index_shard_outside_the_folder_is_refused_unopened(tmp_path, opened, kind):
    outside = outside_file(tmp_path)
    folder = golden_copy(tmp_path, "yi-vl-tiny")
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = {"dotdot": "../outside.safetensors", "absolute": str(outside), "symlink": "link.safetensors"}.get(kind)
    if kind == "symlink":
        (folder / "link.safetensors").symlink_to(outside)
    if kind == "symlinked folder":
        (folder / "sub").symlink_to(tmp_path, target_is_directory=True)
        shard = "sub/outside.safetensors"
    index["weight_map"]["secret"] = shard
    index_path.write_text(json.dumps(index))
    refused_unopened(opened, outside, lambda: open_checkpoint_folder(folder), "weight_map entry for 'secret'")


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_bin_index_shard_outside_the_folder_is_refused_unopened(tmp_path, opened, kind):
    outside = tmp_path / "outside.bin"
    torch.save({"secret": torch.frombuffer(bytearray(SECRET), dtype=torch.uint8)}, outside)
    folder = golden_copy(tmp_path, "yi-vl-tiny-bin")
    index_path = folder / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    shard = {"dotdot": "../outside.bin", "absolute": str(outside), "symlink": "link.bin"}[kind]
    if kind == "symlink":
        (folder / "link.bin").symlink_to(outside)
    index["weight_map"]["secret"] = shard
    index_path.write_text(json.dumps(index))
    refused_unopened(opened, outside, lambda: open_checkpoint_folder(folder), "weight_map entry for 'secret'")


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink"])
def test_yivl_vision_tower_outside_the_folder_is_refused_unopened(tmp_path, opened, kind):
    folder = golden_copy(tmp_path, "yi-vl-tiny")
    config = json.loads((folder / "config.json").read_text())
    vit = folder / config["mm_vision_tower"]
    outside_vit = tmp_path / "outside-vit"
    shutil.move(vit, outside_vit)
    outside = outside_vit / "model.safetensors"
    tower = {"dotdot": "../outside-vit", "absolute": str(outside_vit), "symlink": "./vit/link"}[kind]
    if kind == "symlink":
        (folder / "vit" / "link").symlink_to(outside_vit, target_is_directory=True)
    config["mm_vision_tower"] = tower
    (folder / "config.json").write_text(json.dumps(config))
    refused_unopened(opened, outside, lambda: minisail.load(folder), "mm_vision_tower")
    assert (outside_vit / "config.json").resolve() not in opened


@pytest.mark.parametrize("name", ["config.json", "model.safetensors", "tokenizer_config.json"])
def test_fixed_name_file_linked_out_is_refused_unopened(tmp_path, opened, name):
    folder = golden_copy(tmp_path, "internvl-qwen2-tiny")
    outside = outside_file(tmp_path, "outside.json")
    if (folder / name).exists():
        (folder / name).unlink()
    (folder / name).symlink_to(outside)
    with pytest.raises(minisail.errors.MinisailError, match="symbolic link") as error:
        minisail.load(folder)
    assert outside.resolve() not in opened
    assert SECRET.decode() not in str(error.value)


@pytest.mark.parametrize(
    "index",
    [
        {"weight_map": ["model.safetensors"]},
        {"weight_map": {"a": 1}},
        {"weight_map": {"a": None}},
        {"weight_map": {"a": ""}},
        {"weight_map": {"a": "x\u0000y"}},
        {"metadata": {}},
        [],
    ],
    ids=["list", "int", "null", "empty", "NUL", "no weight_map", "not an object"],
)
def test_malformed_index_is_refused(tmp_path, index):
    folder = golden_copy(tmp_path, "yi-vl-tiny")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model.safetensors.index.json"):
        open_checkpoint_folder(folder)


@pytest.mark.parametrize("text", ['{"weight_map": ' + "[" * 100_000, '{"weight_map": {"a": NaN}}', "9" * 5000])
def test_hostile_index_json_is_refused(tmp_path, text):
    folder = golden_copy(tmp_path, "yi-vl-tiny")
    (folder / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError, match="not a valid checkpoint index"):
        open_checkpoint_folder(folder)


def test_huge_index_is_refused_unread(tmp_path, opened):
    folder = golden_copy(tmp_path, "yi-vl-tiny")
    with open(folder / "model.safetensors.index.json", "r+b") as f:
        f.truncate(65 * 1024 * 1024)  # sparse: no disk used
    opened.clear()
    with pytest.raises(CheckpointError, match="more than the"):
        open_checkpoint_folder(folder)
    assert (folder / "model.safetensors.index.json").resolve() not in opened


def hub_cache(tmp_path: Path, case: str, repo: str = "models--org--tiny") -> Path:
    """The golden case's checkpoint laid out as the Hugging Face hub cache does: real folders under
    snapshots/<rev>/, every file a relative symlink to ../../blobs/<hash> (deeper for sub-folders)."""
    root = tmp_path / "hub" / repo
    snapshot = root / "snapshots" / "0123abcd"
    (root / "blobs").mkdir(parents=True)
    source = GOLDEN / case / "checkpoint"
    for number, file in enumerate(sorted(p for p in source.rglob("*") if p.is_file())):
        blob = root / "blobs" / f"{number:040x}"
        shutil.copyfile(file, blob)
        link = snapshot / file.relative_to(source)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(Path(*[".."] * (len(link.relative_to(root).parts) - 1), "blobs", blob.name))
    return snapshot


@pytest.mark.parametrize("case", ["internvl-qwen2-tiny", "yi-vl-tiny"])
def test_hub_cache_layout_loads(tmp_path, case):
    from minisail.parity import run_case

    snapshot = hub_cache(tmp_path, case)
    assert all(p.is_symlink() for p in snapshot.rglob("*") if p.is_file())
    run = tmp_path / "case"
    run.mkdir()
    for name in ("meta.json", "inputs.safetensors", "expected.safetensors"):
        if (GOLDEN / case / name).exists():
            shutil.copyfile(GOLDEN / case / name, run / name)
    (run / "checkpoint").symlink_to(snapshot, target_is_directory=True)
    assert run_case(run).passed


def test_hub_cache_link_to_another_repository_is_refused(tmp_path, opened):
    snapshot = hub_cache(tmp_path, "internvl-qwen2-tiny")
    other = hub_cache(tmp_path, "internvl-qwen2-tiny", repo="models--other--repo")
    target = (snapshot / "model.safetensors").resolve()
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(other.parent.parent / "blobs" / target.name)
    opened.clear()
    with pytest.raises(CheckpointError, match="symbolic link"):
        open_checkpoint_folder(snapshot)
    assert (other.parent.parent / "blobs" / target.name).resolve() not in opened


# --- .bin: views, compression, pickle size -----------------------------------------------------------------------


def rewrite_zip(source: Path, target: Path, *, compress=zipfile.ZIP_STORED, change=None) -> Path:
    """`source`'s records written again into `target`, compressed with `compress`, each passed through change()."""
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(target, "w") as out:
        for info in archive.infolist():
            data = archive.read(info.filename)
            out.writestr(info.filename, change(info.filename, data) if change else data, compress_type=compress)
    return target


def test_valid_bin_still_loads(tmp_path):
    weights = {"w": torch.randn(3, 4), "t": torch.randn(4, 3).t(), "part": torch.arange(10.0)[2:5]}
    torch.save(weights, tmp_path / "ok.bin")
    loaded = load_bin(tmp_path / "ok.bin")
    for name, tensor in weights.items():
        assert torch.equal(loaded[name], tensor)
    rewritten = rewrite_zip(tmp_path / "ok.bin", tmp_path / "rezipped.bin")  # another writer, stored records
    assert torch.equal(load_bin(rewritten)["w"], weights["w"])


@pytest.mark.parametrize(
    "make",
    [
        lambda: torch.ones(1).expand(1 << 20),
        lambda: torch.ones(1).expand(1024, 1024),
        lambda: torch.arange(8.0).as_strided((4, 4), (1, 1)),
        lambda: torch.arange(8.0).as_strided((4,), (2,)),  # holes: not dense
    ],
    ids=["stride-0", "stride-0 2d", "overlapping", "holes"],
)
def test_bin_overlapping_or_expanded_views_are_refused(tmp_path, make):
    torch.save({"w": make()}, tmp_path / "x.bin")
    with pytest.raises(CheckpointError, match="x.bin: tensor 'w'.*overlap"):
        load_bin(tmp_path / "x.bin")


def test_bin_deflated_records_are_refused(tmp_path):
    torch.save({"w": torch.arange(1000.0)}, tmp_path / "x.bin")
    deflated = rewrite_zip(tmp_path / "x.bin", tmp_path / "deflated.bin", compress=zipfile.ZIP_DEFLATED)
    with pytest.raises(CheckpointError, match="deflated.bin: zip record .* is compressed"):
        load_bin(deflated)


def test_bin_record_past_the_end_is_refused(tmp_path):
    torch.save({"w": torch.arange(1000.0)}, tmp_path / "x.bin")
    blob = bytearray((tmp_path / "x.bin").read_bytes())
    at = blob.index(b"PK\x01\x02")  # the first central-directory entry (data.pkl): claim 1 GB of data
    while at >= 0:
        name_len = struct.unpack_from("<H", blob, at + 28)[0]
        if blob[at + 46 : at + 46 + name_len].endswith(b"data/0"):
            struct.pack_into("<II", blob, at + 20, 1 << 30, 1 << 30)
        at = blob.find(b"PK\x01\x02", at + 4)
    (tmp_path / "lying.bin").write_bytes(bytes(blob))
    with pytest.raises(CheckpointError, match="lying.bin"):
        load_bin(tmp_path / "lying.bin")


def test_bin_oversized_pickle_is_refused(tmp_path, monkeypatch):
    import minisail.checkpoint.torch_bin as torch_bin

    torch.save({f"name{i}": torch.zeros(1) for i in range(100)}, tmp_path / "x.bin")
    monkeypatch.setattr(torch_bin, "MAX_PICKLE_BYTES", 1000)  # the real bound (64 MB) scaled down
    with pytest.raises(CheckpointError, match="data.pkl.* pickle, more than"):
        load_bin(tmp_path / "x.bin")


def test_bin_truncated_is_refused(tmp_path):
    torch.save({"w": torch.arange(1000.0)}, tmp_path / "x.bin")
    data = (tmp_path / "x.bin").read_bytes()
    for cut in (10, len(data) // 2, len(data) - 10):
        (tmp_path / "cut.bin").write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="cut.bin"):
            load_bin(tmp_path / "cut.bin")
