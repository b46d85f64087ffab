"""PyTorch `.bin` checkpoints (Yi-VL's main-branch layout), read safely and without copies.

Layouts (as transformers' save_pretrained wrote them before safetensors):
- `pytorch_model.bin`                                              one file
- `pytorch_model.bin.index.json` + `pytorch_model-0000k-of-0000n.bin`   shards; the index's `weight_map` is
  followed exactly, as for safetensors.

Every file is opened with `torch.load(path, weights_only=True, mmap=True, map_location="cpu")` and nothing else:
- `weights_only`: PyTorch's restricted unpickler, which builds tensors, containers and numbers only. A pickle
  that needs anything more (a class, a function: arbitrary code) is refused with a `CheckpointError`;
  minisail never executes pickled code.
- `mmap`: the tensors are views into a private memory map of the file's storage records (zero-copy, like
  `SafetensorsFile.view`). This needs the zip format torch.save has written since PyTorch 1.6; a legacy file
  is refused with a message saying so.
- A truncated or corrupt file is a `CheckpointError` naming it (the zip's directory sits at the end, so a cut
  anywhere loses it and torch refuses to open the archive).

The file is untrusted, so before torch.load sees it `check_zip` reads the zip directory with Python's zipfile
and refuses any record that is compressed (with mmap=True torch maps a record's raw bytes, so a deflated
record would load as wrong values), whose bytes do not fit inside the file, or a pickle (data.pkl) over
MAX_PICKLE_BYTES (so a hostile pickle cannot make the unpickler allocate gigabytes). After loading,
`check_tensor` refuses a tensor whose view is not non-overlapping and dense (a stride-0 view of one element
that a copy would expand to gigabytes) or does not lie inside its storage, or a storage larger than the file.

`BinTensors` is a `TensorSource` (checkpoint/source.py), like `files.CheckpointTensors`, so the strict loader
works on either; sharded folders are found through the same index reader (`paths.read_shards`).
"""

from __future__ import annotations

import pickle
import struct
import zipfile
from pathlib import Path

import torch

from minisail.checkpoint.paths import check_weight_map, inside, read_shards, shown
from minisail.errors import CheckpointError

ZIP_MAGIC = b"PK\x03\x04"  # a zip local-file header: every torch.save file since PyTorch 1.6 starts with it
MAX_PICKLE_BYTES = 64 * 1024 * 1024  # a state dict's pickle holds names and storage keys: ~100 bytes a tensor


def _first_line(error: BaseException, marker: str = "") -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    chosen = next((line for line in lines if marker and marker in line), lines[0] if lines else type(error).__name__)
    return chosen[:300]


def check_zip(path: Path, size: int) -> None:
    """Every record of the zip stored uncompressed, inside the file, and the pickle of a sane size."""
    try:
        with zipfile.ZipFile(path) as archive, open(path, "rb") as f:
            for info in archive.infolist():
                what = f"{path}: zip record {shown(info.filename)}"
                if info.compress_type != zipfile.ZIP_STORED or info.compress_size != info.file_size:
                    raise CheckpointError(
                        f"{what} is compressed (method {info.compress_type}); torch.save never compresses, and "
                        "minisail memory-maps records as they are stored. Re-save it with torch.save"
                    )
                f.seek(info.header_offset)
                local = f.read(30)  # the local file header: its name and extra lengths say where the data starts
                if len(local) < 30 or local[:4] != ZIP_MAGIC:
                    raise CheckpointError(
                        f"{what} has no local header at byte {info.header_offset}: the file is corrupt"
                    )
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                end = info.header_offset + 30 + name_len + extra_len + info.file_size
                if end > size:
                    raise CheckpointError(
                        f"{what} ends at byte {end} but the file has {size}: it is truncated or corrupt"
                    )
                if info.filename.rsplit("/", 1)[-1] == "data.pkl" and info.file_size > MAX_PICKLE_BYTES:
                    raise CheckpointError(
                        f"{what} is a {info.file_size}-byte pickle, more than the {MAX_PICKLE_BYTES} a state dict "
                        "needs: the file is not a checkpoint minisail will unpickle"
                    )
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, struct.error) as error:
        raise CheckpointError(f"{path} is truncated or corrupt ({_first_line(error)}): download it again") from None


def is_non_overlapping_and_dense(tensor: torch.Tensor) -> bool:
    """Each element has its own place and the elements fill one block: strides, sorted, are the running product
    of the sizes (any permutation of a contiguous layout, e.g. a transposed weight, qualifies)."""
    if tensor.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(tensor.stride(), tensor.shape, strict=True) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def check_tensor(path: Path, name: str, tensor: torch.Tensor, size: int) -> None:
    storage_bytes = tensor.untyped_storage().nbytes()
    if storage_bytes > size:
        raise CheckpointError(f"{path}: tensor {shown(name)}'s storage is {storage_bytes} bytes, more than the file")
    if not is_non_overlapping_and_dense(tensor):
        raise CheckpointError(
            f"{path}: tensor {shown(name)} of shape {list(tensor.shape)} has strides {tensor.stride()}: its elements "
            "overlap or leave holes (a stride-0 view expands a few stored bytes into a tensor a copy makes huge). "
            "torch.save writes dense tensors; the file is corrupt or hostile"
        )
    if tensor.numel():
        last = tensor.storage_offset() + sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride(), strict=True))
        if (last + 1) * tensor.element_size() > storage_bytes:
            raise CheckpointError(f"{path}: tensor {shown(name)} reaches past the end of its storage")


def load_bin(path: str | Path) -> dict[str, torch.Tensor]:
    """The {name: tensor} state dict of one .bin file, tensors memory-mapped (not read into RAM)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as error:
        raise CheckpointError(f"cannot read {path}: {error}") from error
    if magic != ZIP_MAGIC:
        raise CheckpointError(
            f"{path} is not a zip-format PyTorch checkpoint: it is empty, corrupt, or in the legacy (PyTorch < 1.6) "
            "torch.save format, which cannot be memory-mapped. Download it again, or convert it to safetensors"
        )
    size = path.stat().st_size
    check_zip(path, size)
    try:
        state = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except pickle.UnpicklingError as error:
        reason = _first_line(error, marker="WeightsUnpickler error")
        raise CheckpointError(
            f"{path}: refused by torch.load(weights_only=True): {reason}. The pickle needs more than tensors and "
            "plain containers to load (or is corrupt); minisail never runs pickled code. If you trust the file, "
            "convert it to safetensors with the tool that made it"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        raise CheckpointError(f"{path} is truncated or corrupt ({_first_line(error)}): download it again") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} holds a {type(state).__name__}, not a {{name: tensor}} state dict")
    odd = [name for name, value in state.items() if not (isinstance(name, str) and isinstance(value, torch.Tensor))]
    if odd:
        raise CheckpointError(
            f"{path} is not a flat {{name: tensor}} state dict (entry {odd[0]!r} is a "
            f"{type(state[odd[0]]).__name__}): it is not a transformers checkpoint"
        )
    for name, tensor in state.items():
        check_tensor(path, name, tensor, size)
    return state


class BinTensors:
    """The tensors of one or more .bin files, by name: a `TensorSource` (checkpoint/source.py)."""

    def __init__(self, files: dict[Path, dict[str, torch.Tensor]], description: str):
        self.description = description
        self.tensors: dict[str, torch.Tensor] = {}
        self.location: dict[str, Path] = {}  # name -> the file that holds it
        for path, state in files.items():
            for name, tensor in state.items():
                if name in self.tensors:
                    raise CheckpointError(f"{description}: tensor {name!r} is stored in two files")
                self.tensors[name], self.location[name] = tensor, path

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def keys(self):
        return self.tensors.keys()

    def dtype(self, name: str) -> torch.dtype:
        return self.tensors[name].dtype

    def shape(self, name: str) -> list[int]:
        return list(self.tensors[name].shape)

    def view(self, name: str) -> torch.Tensor:
        return self.tensors[name]  # shares memory with the (privately mapped) file

    def read(self, name: str) -> torch.Tensor:
        return self.tensors[name].clone(memory_format=torch.contiguous_format)  # a fresh copy

    def release(self, name: str) -> None:
        pass  # torch.load's tensors: nothing to give back

    def paths(self) -> list[Path]:
        return list(dict.fromkeys(self.location.values()))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


def open_bin_folder(folder: Path, prefix: str = "pytorch_model") -> BinTensors:
    """The tensors of `folder`/{prefix}.bin or of the shards listed in {prefix}.bin.index.json."""
    single = inside(folder, f"{prefix}.bin", "the weights file")
    index = inside(folder, f"{prefix}.bin.index.json", "the index file")
    if index.is_file():
        weight_map, shard_names = read_shards(folder, index.name)
        tensors = BinTensors({folder / name: load_bin(folder / name) for name in shard_names}, str(folder))
        check_weight_map(folder, index.name, weight_map, tensors.location.get)
        return tensors
    if single.is_file():
        return BinTensors({single: load_bin(single)}, str(single))
    raise CheckpointError(f"{folder} has neither {single.name} nor {index.name}")
