"""Yi-VL: loading both official layouts (safetensors / torch .bin + the vit/<name>/ folder), the .bin safety rules,
and LLaVA's image splice (shapes, batches, generation). The numbers themselves are checked by the golden cases
yi-vl-tiny, yi-vl-tiny-bin and yi-vl-textonly (tests/golden_cases/test_golden.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import paths

import minisail
from minisail.checkpoint.files import open_checkpoint_folder
from minisail.checkpoint.torch_bin import load_bin
from minisail.errors import CheckpointError, ConfigError, ImageError, PromptError
from minisail.generate import greedy_generate
from minisail.image import yivl_pixel_values
from minisail.llm.decoder import positions_from_mask
from minisail.models import yivl
from minisail.models.registry import detect_family
from minisail.models.yivl import splice_images
from minisail.parity import read_tensors
from minisail.text.prompt import YIVL_IMAGE_TOKEN_INDEX

GOLDEN = paths.GOLDEN
TINY, TINY_BIN, TEXT = GOLDEN / "yi-vl-tiny", GOLDEN / "yi-vl-tiny-bin", GOLDEN / "yi-vl-textonly"
VIT = "vit/clip-vit-tiny-p14-yi-vl-56"
IMG_TOKENS = 16  # 56 px / 14 = 4 x 4 patches per image


@pytest.fixture(scope="module")
def model():
    return minisail.load(TINY / "checkpoint", dtype=torch.float32)


@pytest.fixture(scope="module")
def inputs():
    return read_tensors(TINY / "inputs.safetensors")


def copy_checkpoint(tmp_path: Path, case: Path = TINY) -> Path:
    return Path(shutil.copytree(case / "checkpoint", tmp_path / "checkpoint"))


# --- loading ---------------------------------------------------------------------------------------------------


def test_bin_and_safetensors_layouts_load_the_same_weights(model):
    from_bin = minisail.load(TINY_BIN / "checkpoint", dtype=torch.float32)
    assert model.family == from_bin.family == "yi-vl"
    ours, theirs = model.state_dict(), from_bin.state_dict()
    assert ours.keys() == theirs.keys()
    for name in ours:
        assert torch.equal(ours[name], theirs[name]), name


def test_the_tower_comes_from_the_vit_folder_not_the_main_shards(model):
    vit = open_checkpoint_folder(TINY / "checkpoint" / VIT)
    main = open_checkpoint_folder(TINY / "checkpoint")
    name = "vision_model.embeddings.position_embedding.weight"
    loaded = model.vision_tower.embeddings.position_embedding.weight
    assert vit.dtype(name) == torch.float32 and main.dtype(f"model.vision_tower.vision_tower.{name}") == torch.bfloat16
    assert torch.equal(loaded, vit.read(name))
    assert not torch.equal(loaded, main.read(f"model.vision_tower.vision_tower.{name}").float())
    # hidden_states[-2] of a 4-block tower: 3 blocks are built, the 4th block's keys are ignored on purpose
    assert len(model.vision_tower.encoder.layers) == 3
    assert model.image_token_id == YIVL_IMAGE_TOKEN_INDEX


def test_bf16_load_casts_the_fp32_tower_too(inputs, model):
    # Upstream casts the fp32 vit/ tower to the model's bf16. (With no dtype given, minisail takes the dtype holding
    # most bytes: bf16 for the releases, where the LLM dwarfs the tower; fp32 here, where the tower is the bulk.)
    bf16 = minisail.load(TINY / "checkpoint", dtype="bf16")
    assert {p.dtype for p in bf16.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        logits = bf16(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
        reference = model(inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"])
    assert logits.dtype == torch.float32 and (logits - reference).abs().max() < 0.05


def test_missing_vit_folder(tmp_path):
    folder = copy_checkpoint(tmp_path)
    shutil.rmtree(folder / "vit")
    with pytest.raises(CheckpointError, match="mm_vision_tower .*download it too"):
        minisail.load(folder)


def test_vit_folder_without_weights(tmp_path):
    folder = copy_checkpoint(tmp_path)
    (folder / VIT / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="has no weights"):
        minisail.load(folder)


def test_an_unexpected_tensor_in_the_vit_folder_is_an_error(tmp_path):
    from safetensors.torch import save_file

    folder = copy_checkpoint(tmp_path)
    vit = open_checkpoint_folder(folder / VIT)
    stored = {name: vit.read(name).clone() for name in vit.keys()}
    del vit
    tensors = {**stored, "vision_model.encoder.layers.4.mlp.fc1.bias": torch.zeros(256)}  # a 5th block
    save_file(tensors, folder / VIT / "model.safetensors")
    with pytest.raises(CheckpointError, match="num_hidden_layers = 4, but the checkpoint numbers 5"):
        minisail.load(folder)  # counted before the build
    tensors = {**stored, "vision_model.encoder.layers.1.mlp.fc9.bias": torch.zeros(256)}
    save_file(tensors, folder / VIT / "model.safetensors")
    with pytest.raises(CheckpointError, match="not used by the model"):
        minisail.load(folder)


def test_nested_clip_config_in_the_vit_folder(tmp_path):
    folder = copy_checkpoint(tmp_path, TEXT)
    vit_config = json.loads((folder / VIT / "config.json").read_text())
    (folder / VIT / "config.json").write_text(json.dumps({"model_type": "clip", "vision_config": vit_config}))
    assert minisail.load(folder).config.vision.num_layers == 4


# --- .bin files ------------------------------------------------------------------------------------------------


class Payload:
    """Unpickling this would create `marker`: proof that no pickled code runs."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_bin_that_needs_more_than_tensors_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "pytorch_model.bin"
    torch.save({"weight": torch.ones(2), "payload": Payload(marker)}, path)
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin: refused by torch\.load\(weights_only=True\)"):
        load_bin(path)
    assert not marker.exists()


def test_truncated_bin_names_the_file(tmp_path):
    data = (TINY_BIN / "checkpoint" / "pytorch_model-00001-of-00002.bin").read_bytes()
    path = tmp_path / "pytorch_model-00001-of-00002.bin"
    for cut in (len(data) // 2, len(data) - 7, 100):
        path.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match=r"pytorch_model-00001-of-00002\.bin is truncated or corrupt"):
            load_bin(path)


def test_truncated_shard_fails_the_whole_load(tmp_path):
    folder = copy_checkpoint(tmp_path, TINY_BIN)
    shard = folder / "pytorch_model-00002-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="00002-of-00002.bin is truncated"):
        minisail.load(folder)


@pytest.mark.parametrize("content", [b"", b"not a checkpoint at all", "legacy"])
def test_non_zip_bin(tmp_path, content):
    path = tmp_path / "pytorch_model.bin"
    if content == "legacy":
        torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(content)
    with pytest.raises(CheckpointError, match="not a zip-format PyTorch checkpoint"):
        load_bin(path)


def test_bin_that_is_not_a_flat_state_dict(tmp_path):
    path = tmp_path / "pytorch_model.bin"
    torch.save({"model": {"w": torch.ones(2)}}, path)
    with pytest.raises(CheckpointError, match="not a flat"):
        load_bin(path)
    torch.save([torch.ones(2)], path)
    with pytest.raises(CheckpointError, match="holds a list"):
        load_bin(path)


def test_bin_index_is_followed_exactly(tmp_path):
    folder = copy_checkpoint(tmp_path, TINY_BIN)
    index_path = folder / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    name = next(iter(index["weight_map"]))
    right = index["weight_map"][name]
    index["weight_map"][name] = next(s for s in set(index["weight_map"].values()) if s != right)
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="that shard does not hold it"):
        open_checkpoint_folder(folder)
    (folder / right).unlink()
    with pytest.raises(CheckpointError, match="missing"):
        open_checkpoint_folder(folder)


def test_bin_views_are_zero_copy():
    tensors = open_checkpoint_folder(TINY_BIN / "checkpoint" / VIT)
    name = "vision_model.pre_layrnorm.weight"
    assert tensors.view(name).data_ptr() == tensors.view(name).data_ptr()  # the mapped tensor itself
    fresh = tensors.read(name)
    assert torch.equal(fresh, tensors.view(name)) and fresh.data_ptr() != tensors.view(name).data_ptr()


# --- config ----------------------------------------------------------------------------------------------------


def full_config(case: Path = TINY) -> dict:

    config = json.loads((case / "checkpoint" / "config.json").read_text())
    return yivl.complete_config(case / "checkpoint", config)


def test_config_reading():
    config = yivl.parse(full_config())
    assert (config.select_layer, config.select_feature, config.projector_depth) == (-2, "patch", 2)
    assert config.tokens_per_image == IMG_TOKENS and config.image_size == 56
    assert config.vision.hidden_act == "gelu" and config.llm.rope_theta == 5e6 and config.llm.num_kv_heads == 2


@pytest.mark.parametrize(
    "change, message",
    [
        ({"mm_projector_type": "mlp2x_gelu"}, "mm_projector_type"),
        ({"mm_hidden_size": 128}, "mm_hidden_size"),
        ({"mm_vision_select_layer": -6}, "mm_vision_select_layer"),
        ({"mm_vision_select_feature": "cls"}, "mm_vision_select_feature"),
        ({"mm_use_im_start_end": True}, "mm_use_im_start_end"),
    ],
)
def test_config_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        yivl.parse({**full_config(), **change})


def test_only_yi_vl_llava_configs_match():
    config = json.loads((TINY / "checkpoint" / "config.json").read_text())
    assert detect_family(config).NAME == "yi-vl"
    hf_port = {"model_type": "llava", "text_config": {}, "vision_config": {}}  # LLaMA-Factory's -hf conversions
    with pytest.raises(ConfigError, match="does not support"):
        detect_family(hf_port)


# --- the splice ------------------------------------------------------------------------------------------------


def test_preprocessing_gives_the_golden_pixels(inputs):
    pixels = yivl_pixel_values(paths.DATA / "yi-vl" / "images" / "cats.jpg", image_size=56)
    assert torch.equal(pixels, inputs["pixel_values"])


def test_splice_shapes_and_placement(model, inputs):
    ids, mask, pixels = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
    slot = int((ids[0] == YIVL_IMAGE_TOKEN_INDEX).nonzero())
    with torch.no_grad():
        prepared = model.prepare_inputs(ids, mask, pixels)
        image = model.encode_images(pixels)
        text = model.language_model.embed(ids.clamp(min=0))
    T = ids.shape[1]
    assert image.shape == (1, IMG_TOKENS, 64)
    assert prepared.embeds.shape == (1, T - 1 + IMG_TOKENS, 64) and prepared.attention_mask.shape == (1, T - 1 + 16)
    assert bool(prepared.attention_mask.all()) and prepared.visual_mask is None
    assert torch.equal(prepared.embeds[0, :slot], text[0, :slot])
    assert torch.equal(prepared.embeds[0, slot : slot + IMG_TOKENS], image[0])
    assert torch.equal(prepared.embeds[0, slot + IMG_TOKENS :], text[0, slot + 1 :])


def test_splice_left_pads_rows_of_different_lengths():
    H = 3
    ids = torch.tensor([[5, YIVL_IMAGE_TOKEN_INDEX, 6, YIVL_IMAGE_TOKEN_INDEX], [0, 7, 8, 9]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 1, 1, 1]])
    text = torch.arange(2 * 4 * H, dtype=torch.float32).view(2, 4, H)
    images = -torch.arange(1, 2 * 2 * H + 1, dtype=torch.float32).view(2, 2, H)  # 2 images of 2 rows
    embeds, new_mask = splice_images(ids, mask, text, images)
    assert embeds.shape == (2, 6, H)
    assert new_mask.tolist() == [[1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]]
    assert torch.equal(embeds[0], torch.cat([text[0, :1], images[0], text[0, 2:3], images[1]]))
    assert torch.equal(embeds[1, 2:], text[1]) and not embeds[1, :2].any()


def test_splice_errors(model, inputs):
    ids, mask, pixels = inputs["input_ids"], inputs["attention_mask"], inputs["pixel_values"]
    with pytest.raises(PromptError, match="1 image placeholders .* 2 images"):
        model.prepare_inputs(ids, mask, torch.cat([pixels, pixels]))
    with pytest.raises(PromptError, match="no pixel_values"):
        model.prepare_inputs(ids, mask)
    padded = mask.clone()
    padded[0, : int((ids[0] == YIVL_IMAGE_TOKEN_INDEX).nonzero()) + 1] = 0
    with pytest.raises(PromptError, match="padded position"):
        model.prepare_inputs(ids, padded, pixels)
    with pytest.raises(PromptError, match="outside the vocabulary"):
        model.prepare_inputs(torch.tensor([[1, -5, 2]]))
    with pytest.raises(ImageError, match="not interpolated"):
        model.encode_images(torch.zeros(1, 3, 112, 112))


def test_batch_matches_rows_run_alone(model, inputs):
    """Row 0: the golden prompt with its image; row 1: two images in a shorter prompt; row 2: text only.
    Spliced lengths differ, so rows 1 and 2 are left-padded after the splice; logits and greedy tokens of every
    row must equal those of the row run alone."""
    ids, pixels = inputs["input_ids"][0], inputs["pixel_values"]
    flipped = pixels.flip(-1)
    two_images = torch.tensor([30, 31, YIVL_IMAGE_TOKEN_INDEX, 14, 40, YIVL_IMAGE_TOKEN_INDEX, 14, 41, 42])
    text_only = torch.tensor([50, 51, 52, 53, 54])
    rows = [(ids, pixels), (two_images, torch.cat([flipped, pixels])), (text_only, None)]
    T = max(len(r) for r, _ in rows)
    batch_ids = torch.zeros(3, T, dtype=torch.long)
    batch_mask = torch.zeros(3, T, dtype=torch.long)
    for b, (row, _) in enumerate(rows):  # left-padded, as a tokenizer pads for generation
        batch_ids[b, T - len(row) :], batch_mask[b, T - len(row) :] = row, 1
    batch_pixels = torch.cat([pixels, flipped, pixels])
    with torch.no_grad():
        prepared = model.prepare_inputs(batch_ids, batch_mask, batch_pixels)
        logits = model(batch_ids, batch_mask, batch_pixels)
        tokens = greedy_generate(model, batch_ids, batch_mask, batch_pixels, max_new_tokens=6)
        lengths = [len(row) + (IMG_TOKENS - 1) * int((row == YIVL_IMAGE_TOKEN_INDEX).sum()) for row, _ in rows]
        assert prepared.attention_mask.sum(-1).tolist() == lengths
        assert positions_from_mask(prepared.attention_mask)[:, -1].tolist() == [n - 1 for n in lengths]
        for b, (row, row_pixels) in enumerate(rows):
            alone = model(row[None], None, row_pixels)[0]  # [n, V]
            torch.testing.assert_close(logits[b, -len(alone) :], alone, atol=1e-5, rtol=0)
            alone_tokens = greedy_generate(model, row[None], None, row_pixels, max_new_tokens=6)
            assert tokens[b].tolist() == alone_tokens[0].tolist()


def test_a_tokenizer_with_an_img_context_token_does_not_replace_the_placeholder(tmp_path):
    # Yi-VL's image placeholder is the fixed id -200, outside the vocabulary: a tokenizer folder that happens to
    # define <IMG_CONTEXT> (an InternVL one, copied in) must not move it
    folder = shutil.copytree(TINY / "checkpoint", tmp_path / "checkpoint")
    table = {"added_tokens_decoder": {"151667": {"content": "<IMG_CONTEXT>", "special": True}}}
    (folder / "tokenizer_config.json").write_text(json.dumps(table))
    assert minisail.load(folder).image_token_id == YIVL_IMAGE_TOKEN_INDEX
