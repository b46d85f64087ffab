"""Which files a checkpoint may consist of: every name minisail opens is confined to the folder the user named.

A checkpoint folder names other files: an index's `weight_map` names its shards, Yi-VL's config names its vision
folder (`mm_vision_tower`), and minisail itself reads fixed names (config.json, the index files, the tokenizer
tables). A downloaded folder is untrusted input, so each of those names goes through `inside` before anything
is opened: a name that climbs out (`..`), is absolute, or is a symbolic link to a file elsewhere is a
`CheckpointError` naming the entry, raised before the outside file is touched.

`read_index` reads a shard index (`model.safetensors.index.json`, `pytorch_model.bin.index.json`) with the
same care: bounded in size and nesting, `weight_map` a {tensor name: shard name} object, every shard inside.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from minisail.checkpoint.strict_json import JSONError, loads
from minisail.errors import CheckpointError

MAX_INDEX_BYTES = 64 * 1024 * 1024  # the largest real index (a 1T-parameter model) is a few MB
MAX_INDEX_DEPTH = 16  # an index is {"metadata": {...}, "weight_map": {...}}: 2 levels in practice


def shown(value, limit: int = 120) -> str:
    """repr(value), cut to `limit` characters: names from a hostile file can be megabytes long."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 5] + "...'"


def _hub_blobs(folder: Path) -> Path | None:
    """The `blobs/` folder of the Hugging Face hub-cache repository holding `folder`, if it is in one.

    The hub cache keeps a repository as `models--ORG--NAME/{blobs,snapshots/<revision>}`; a snapshot's files
    are symbolic links to `../../blobs/<hash>` (deeper for files in sub-folders)."""
    for snapshot in (folder, *folder.parents):
        snapshots = snapshot.parent
        repo = snapshots.parent
        if snapshots.name == "snapshots" and repo.name.startswith("models--") and (repo / "blobs").is_dir():
            return repo / "blobs"
    return None


def inside(folder: str | os.PathLike, name: str, what: str) -> Path:
    """`folder / name`, after checking that it stays inside `folder`; refused with a CheckpointError otherwise.

    `what` says where the name came from (e.g. "model.safetensors.index.json's weight_map entry for 'x'").

    Accepted: a plain file name or a relative path below `folder` ("vit/clip/config.json", "./vit/..."); the
    file need not exist (callers check that and say what is missing). Refused, before anything is opened: an
    empty name, a NUL byte, an absolute path or a drive (POSIX or Windows spelling), any `..` component, and a
    name whose real path (every symbolic link followed) lies outside `folder`'s real path.

    One exception, a judgment call: the Hugging Face hub cache (`huggingface-cli download` without
    `--local-dir`, `from_pretrained`'s cache) is the most common way users hold checkpoints, and there every
    file of `models--ORG--NAME/snapshots/<rev>/` is a symbolic link to `models--ORG--NAME/blobs/<hash>`. A link
    whose target is a file directly in the same repository's `blobs/` folder is therefore accepted; a link to
    anywhere else (another repository's blobs included) is refused.

    The returned path is the name joined to `folder` as the user sees it (not the resolved target), so file
    names and messages stay the checkpoint's own. The check and the later open are two steps: a folder that is
    rewritten in between by someone else is outside what this guards against.
    """
    folder = Path(folder)
    if not isinstance(name, str) or not name or "\x00" in name:
        raise CheckpointError(f"{folder}: {what} is {shown(name)}, not a file name inside the checkpoint folder")
    posix, windows = PurePosixPath(name), PureWindowsPath(name)
    if posix.is_absolute() or windows.anchor or ".." in posix.parts or ".." in windows.parts:
        raise CheckpointError(
            f"{folder}: {what} is {shown(name)}, which points outside the checkpoint folder (an absolute path or "
            "'..'); minisail reads only files inside the folder you named. The checkpoint is corrupt or hostile"
        )
    path = folder / name
    try:
        root, target = folder.resolve(), path.resolve()
    except (OSError, RuntimeError) as error:  # a symlink loop, an unreadable folder
        raise CheckpointError(f"{folder}: cannot resolve {what} {shown(name)} ({error})") from None
    if target == root or root in target.parents:
        return path
    blobs = _hub_blobs(root)
    if blobs is not None and target.parent == blobs.resolve():
        return path
    raise CheckpointError(
        f"{folder}: {what} {shown(name)} is a symbolic link to a file outside the checkpoint folder; minisail reads "
        "only files inside the folder you named (or, in a Hugging Face hub cache, in the same repository's blobs/). "
        "Copy the file into the folder, or point minisail at the folder that holds it"
    )


def read_index(folder: Path, index_name: str) -> dict[str, str]:
    """The `weight_map` of `folder`/index_name: {tensor name: shard name}, every shard name checked by `inside`."""
    index = inside(folder, index_name, "the index file")
    try:
        size = index.stat().st_size
        if size > MAX_INDEX_BYTES:
            raise CheckpointError(
                f"{index} is {size} bytes, more than the {MAX_INDEX_BYTES} an index can plausibly need: "
                "it is not a checkpoint index; download it again"
            )
        with open(index, "rb") as f:
            text = f.read(MAX_INDEX_BYTES + 1).decode("utf-8")
        content = loads(text, max_depth=MAX_INDEX_DEPTH)
    except (OSError, UnicodeDecodeError, JSONError) as error:
        raise CheckpointError(f"{index} is not a valid checkpoint index ({error}): download it again") from None
    weight_map = content.get("weight_map") if isinstance(content, dict) else None
    if not isinstance(weight_map, dict):
        raise CheckpointError(
            f"{index} has no 'weight_map' object ({{tensor name: shard file}}): it is not a checkpoint index; "
            "download it again"
        )
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(f"{index}: weight_map[{shown(name)}] is {shown(shard)}, not a shard file name")
        inside(folder, shard, f"{index_name}'s weight_map entry for {shown(name)}")
    return weight_map


def read_shards(folder: Path, index_name: str) -> tuple[dict[str, str], list[str]]:
    """The index's weight_map and the shard names it lists, sorted, every one present in `folder`.

    The one shard-index reader: safetensors and .bin shards are both found through it."""
    weight_map = read_index(folder, index_name)  # every shard name already checked by inside()
    shard_names = sorted(set(weight_map.values()))
    missing = [name for name in shard_names if not (folder / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{folder}: the index lists {len(shard_names)} shards but {len(missing)} are missing: "
            f"{', '.join(missing)}. Download every shard into {folder}"
        )
    return weight_map, shard_names


def check_weight_map(folder: Path, index_name: str, weight_map: dict[str, str], file_of) -> None:
    """Every tensor the index names is in the shard it names: `file_of(name)` is the file holding it, or None."""
    for name, shard in weight_map.items():
        if file_of(name) != folder / shard:
            raise CheckpointError(f"{folder / index_name} says {name!r} is in {shard}, but that shard does not hold it")


MAX_JSON_FILE_BYTES = 16 * 1024 * 1024  # config.json, tokenizer_config.json, ...: real ones are a few KB
MAX_JSON_FILE_DEPTH = 32


def read_json_object(folder: str | os.PathLike, name: str, what: str, error=CheckpointError) -> dict | None:
    """The JSON object in `folder`/name (None if there is no such file), read as untrusted input: confined by
    `inside`, at most MAX_JSON_FILE_BYTES, nested at most MAX_JSON_FILE_DEPTH levels, strict JSON (no NaN), an
    object at the top. Anything else raises `error` (a MinisailError class) naming the file."""
    path = inside(folder, name, what)
    if not path.is_file():
        return None
    try:
        if path.stat().st_size > MAX_JSON_FILE_BYTES:
            raise error(f"{path} is larger than {MAX_JSON_FILE_BYTES} bytes: it is not a {what}; download it again")
        with open(path, "rb") as f:
            content = loads(f.read(MAX_JSON_FILE_BYTES + 1).decode("utf-8"), max_depth=MAX_JSON_FILE_DEPTH)
    except (OSError, UnicodeDecodeError, JSONError) as exc:
        raise error(f"{path} is not valid JSON ({exc}): download it again") from None
    if not isinstance(content, dict):
        raise error(f"{path} holds a JSON {type(content).__name__}, not an object: it is not a {what}")
    return content
