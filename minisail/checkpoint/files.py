"""The tensors of a checkpoint folder, whatever files hold them.

Layouts (the official ones, as save_pretrained writes them):
- `model.safetensors`                                  one file
- `model.safetensors.index.json` + `model-0000k-of-0000n.safetensors`   shards; the index's `weight_map` says
  which shard holds which tensor, and is followed exactly (shard names differ between releases).

`CheckpointTensors` maps every tensor name to the file that holds it and hands out either a zero-copy view
or a fresh copy (see `SafetensorsFile`). A missing shard, a tensor the index promises but the shard lacks,
or a tensor stored twice is a `CheckpointError` that names it. Every file is opened only after
`paths.inside` has checked that it lies inside the folder (shard names in an index are untrusted input).

`open_checkpoint_folder` also takes the PyTorch `.bin` layouts (checkpoint/torch_bin.py), preferring
safetensors when a folder has both. `NamespacedTensors` joins several folders into one set of names (Yi-VL:
the main checkpoint plus the vision tower's `vit/<name>/` folder under "vit."), so a weight map can say
which folder each tensor comes from. All three are `TensorSource`s (checkpoint/source.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from minisail.checkpoint.paths import check_weight_map, inside, read_shards
from minisail.checkpoint.safetensors_mmap import SafetensorsFile
from minisail.checkpoint.source import TensorSource
from minisail.checkpoint.torch_bin import open_bin_folder
from minisail.errors import CheckpointError

SAFETENSORS_NAMES = ("model.safetensors", "model.safetensors.index.json")
BIN_NAMES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


class CheckpointTensors:
    """The tensors of one or more .safetensors files, by name: a `TensorSource` (checkpoint/source.py)."""

    def __init__(self, files: list[SafetensorsFile], description: str):
        self.description = description
        self.location: dict[str, SafetensorsFile] = {}
        for file in files:
            for name in file.entries:
                if name in self.location:
                    raise CheckpointError(f"{description}: tensor {name!r} is stored in two files")
                self.location[name] = file

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def keys(self):
        return self.location.keys()

    def dtype(self, name: str) -> torch.dtype:
        return self.location[name].entries[name][0]

    def shape(self, name: str) -> list[int]:
        return self.location[name].entries[name][1]

    def view(self, name: str) -> torch.Tensor:
        return self.location[name].view(name)

    def read(self, name: str) -> torch.Tensor:
        return self.location[name].read(name)

    def release(self, name: str) -> None:
        self.location[name].release(name)

    def nbytes(self) -> int:
        return sum(f.entries[n][3] - f.entries[n][2] for n, f in self.location.items())

    def paths(self) -> list[Path]:
        """The files behind these tensors, in order."""
        return list(dict.fromkeys(f.path for f in self.location.values()))


def open_safetensors_folder(folder: Path, prefix: str = "model") -> CheckpointTensors:
    """The tensors of `folder`/{prefix}.safetensors or of the shards listed in {prefix}.safetensors.index.json.

    Every file name, the index's shard names included, is checked by `paths.inside` before it is opened."""
    single = inside(folder, f"{prefix}.safetensors", "the weights file")
    index = inside(folder, f"{prefix}.safetensors.index.json", "the index file")
    if index.is_file():
        weight_map, shard_names = read_shards(folder, index.name)
        tensors = CheckpointTensors([SafetensorsFile(folder / name) for name in shard_names], str(folder))
        check_weight_map(folder, index.name, weight_map, lambda name: getattr(tensors.location.get(name), "path", None))
        return tensors
    if single.is_file():
        return CheckpointTensors([SafetensorsFile(single)], str(single))
    raise CheckpointError(
        f"{folder} has neither {single.name} nor {index.name}: point minisail at the checkpoint folder "
        "that holds config.json and the weights"
    )


def open_checkpoint_folder(folder: Path) -> TensorSource:
    """The tensors of `folder`: safetensors (model.safetensors[.index.json]) if present, else PyTorch .bin
    (pytorch_model.bin[.index.json]); each with its index followed exactly."""
    folder = Path(folder)
    if any(inside(folder, name, "a weights file").is_file() for name in SAFETENSORS_NAMES):
        return open_safetensors_folder(folder)
    if any(inside(folder, name, "a weights file").is_file() for name in BIN_NAMES):
        return open_bin_folder(folder)
    raise CheckpointError(
        f"{folder} has no weights (neither model.safetensors[.index.json] nor pytorch_model.bin[.index.json]): "
        "point minisail at the checkpoint folder that holds config.json and the weights"
    )


class NamespacedTensors:
    """Several tensor sets seen as one: the tensor `n` of the set registered under prefix `p` is named `p + n`.

    A `TensorSource` (checkpoint/source.py); views and copies come from the underlying set unchanged.
    """

    def __init__(self, parts: dict[str, TensorSource], description: str):
        self.description = description
        self.location: dict[str, tuple[TensorSource, str]] = {}
        for prefix, tensors in parts.items():
            for name in tensors.keys():
                if prefix + name in self.location:
                    raise CheckpointError(f"{description}: two folders provide a tensor named {prefix + name!r}")
                self.location[prefix + name] = (tensors, name)

    def __contains__(self, name: str) -> bool:
        return name in self.location

    def keys(self):
        return self.location.keys()

    def dtype(self, name: str) -> torch.dtype:
        tensors, inner = self.location[name]
        return tensors.dtype(inner)

    def shape(self, name: str) -> list[int]:
        tensors, inner = self.location[name]
        return tensors.shape(inner)

    def view(self, name: str) -> torch.Tensor:
        tensors, inner = self.location[name]
        return tensors.view(inner)

    def read(self, name: str) -> torch.Tensor:
        tensors, inner = self.location[name]
        return tensors.read(inner)

    def release(self, name: str) -> None:
        tensors, inner = self.location[name]
        tensors.release(inner)

    def paths(self) -> list[Path]:
        return list(dict.fromkeys(p for tensors, _ in self.location.values() for p in tensors.paths()))
