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

`BinTensors` offers the interface of `files.CheckpointTensors` (keys, dtype, shape, view, read, __contains__,
description), so the strict loader works on either.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from minisail.checkpoint.paths import inside, read_index
from minisail.errors import CheckpointError

ZIP_MAGIC = b"PK\x03\x04"  # a zip local-file header: every torch.save file since PyTorch 1.6 starts with it


def _first_line(error: BaseException, marker: str = "") -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    chosen = next((line for line in lines if marker and marker in line), lines[0] if lines else type(error).__name__)
    return chosen[:300]


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
    return state


class BinTensors:
    """The tensors of one or more .bin files, by name (the interface of `CheckpointTensors`)."""

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
        weight_map = read_index(folder, index.name)  # every shard name already checked by inside()
        shard_names = sorted(set(weight_map.values()))
        missing = [name for name in shard_names if not (folder / name).is_file()]
        if missing:
            raise CheckpointError(
                f"{folder}: the index lists {len(shard_names)} shards but {len(missing)} are missing: "
                f"{', '.join(missing)}. Download every shard into {folder}"
            )
        tensors = BinTensors({folder / name: load_bin(folder / name) for name in shard_names}, str(folder))
        for name, shard in weight_map.items():
            if name not in tensors or tensors.location[name] != folder / shard:
                raise CheckpointError(f"{index} says {name!r} is in {shard}, but that shard does not hold it")
        return tensors
    if single.is_file():
        return BinTensors({single: load_bin(single)}, str(single))
    raise CheckpointError(f"{folder} has neither {single.name} nor {index.name}")
