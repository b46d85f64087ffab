"""Yi-VL (01-ai/Yi-VL-6B, -34B): a LLaVA model, CLIP ViT-H -> `mlp2x_gelu_Norm` projector -> Yi (a Llama).

Mirrors Yi `VL/llava/model/llava_llama.py` (LlavaLlamaForCausalLM), `llava_arch.py` (encode_images,
prepare_inputs_labels_for_multimodal) and `clip_encoder/clip_encoder.py` (feature_select), at github
01-ai/Yi @ f73194c.

One image, pixels to logits:
    pixel_values [N images, 3, S, S]          (S = 448, padded to a square: image/preprocess.yivl_pixel_values)
      -> CLIP hidden_states[mm_vision_select_layer] (-2: the output of the second-to-last block)  [N, 1 + g*g, C]
      -> CLS dropped (mm_vision_select_feature "patch")                                    [N, g*g, C]  1024 x 1280
      -> projector (Linear, LayerNorm, GELU, Linear, LayerNorm)                           [N, g*g, H]
      -> spliced into the text embeddings in place of each YIVL_IMAGE_TOKEN_INDEX (-200) of input_ids: no start/end
         tokens, so every image grows the sequence by g*g - 1 (1023)
      -> Llama decoder, positions attention_mask.cumsum(-1) - 1 over the spliced sequence -> logits [B, T', V]

The checkpoint is two folders: config.json is a Llama config plus `mm_*` keys, and `mm_vision_tower` names the
vision tower's own folder relative to the checkpoint (`./vit/clip-vit-H-14-laion2B-s32B-b79K-yi-vl-6B-448`),
with a CLIPVisionModel config.json and float32 weights. Upstream builds the tower from that folder
(delay_load=True), so the bf16 copy of the tower in the main shards is never used: minisail ignores it too.

Batches: upstream splices every row, then right-pads the rows to one length, and at inference (labels=None)
that branch fails (it reads `_new_labels`, defined only for training); rows of equal spliced length get the
mask [original mask, ones]. minisail splices every row and **left**-pads the spliced rows with zero embeddings
(mask 0): identical to upstream whenever upstream runs (left-padded rows of equal spliced length), and what the
shared KV-cache generation expects (every row's last real token at the end). Images are matched to
placeholders in order, row 0 first; unlike upstream, a row without a placeholder consumes no image.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from minisail.checkpoint.files import NamespacedTensors, open_checkpoint_folder
from minisail.checkpoint.paths import inside
from minisail.config import MAX_SIZE, choice, flag, optional, positive, read_config, require
from minisail.errors import CheckpointError, ConfigError, PromptError
from minisail.layers import hidden_state_depth
from minisail.llm.decoder import Decoder, positions_from_mask
from minisail.llm.decoder_config import DecoderConfig
from minisail.models.internvl import PreparedInputs, check_vocabulary
from minisail.projector import LayerNormMLPProjector
from minisail.text.prompt import YIVL_IMAGE_TOKEN_INDEX
from minisail.vision.clip_vit import CLIPVisionConfig, CLIPVisionTower

VIT_PREFIX = "vit."  # the vision folder's tensors, as the weight map sees them


@dataclass(frozen=True)
class YiVLConfig:
    vision: CLIPVisionConfig
    llm: DecoderConfig
    vision_tower: str  # mm_vision_tower as config.json writes it: the vision folder, relative to the checkpoint
    select_layer: int  # mm_vision_select_layer: which CLIP hidden state feeds the projector
    select_feature: str  # "patch" (CLS dropped) or "cls_patch"
    projector_depth: int  # N of mlpNx_gelu_Norm
    template: str = "mm_default"  # llava configs carry no template key; Yi's single_inference.py uses this one

    @property
    def image_size(self) -> int:
        return self.vision.image_size

    @property
    def tokens_per_image(self) -> int:
        return self.vision.grid**2 + (self.select_feature == "cls_patch")


# --- config.json + vit/<name>/config.json -----------------------------------------------------------------------


def vision_folder(folder: Path, config: dict) -> Path:
    """The vision tower's folder: mm_vision_tower joined to the checkpoint folder, as upstream joins it, and
    refused (paths.inside) if it leads outside the checkpoint folder (an absolute path, '..', a link out)."""
    name = require(config, "mm_vision_tower", "the top level", str)
    path = inside(folder, name, "config.json's mm_vision_tower")
    if not path.is_dir():
        raise CheckpointError(
            f"{folder}: config.json's mm_vision_tower {name!r} is not a folder ({path} is missing). Yi-VL checkpoints "
            "ship their CLIP vision tower (config.json + weights) in that folder: download it too"
        )
    return path


def with_vision_config(folder: Path, config: dict) -> dict:
    """config.json plus the vision folder's CLIP config as `vision_config` (what `yivl_config` reads)."""
    vit = read_config(vision_folder(folder, config))
    if isinstance(vit.get("vision_config"), dict):  # a full CLIPConfig: its vision half, as CLIPVisionConfig reads it
        vit = vit["vision_config"]
    return {**config, "vision_config": vit}


def yivl_config(config: dict) -> YiVLConfig:
    """config.json (a Llama config plus LLaVA's mm_* keys, with the vision folder's config as vision_config).

    The projector's GELU and LayerNorm eps are fixed in upstream's builder (no config key), as here."""
    top = "the top level"
    vision = CLIPVisionConfig.from_config(
        require(config, "vision_config", "the top level (see with_vision_config)", dict)
    )
    llm = DecoderConfig.from_config(config, where=top)
    projector = optional(config, "mm_projector_type", top, str, "linear")  # upstream's default
    match = re.fullmatch(r"mlp([0-9]+)x_gelu_Norm", projector)
    if not match or not 1 <= int(match.group(1)) <= MAX_SIZE:
        raise ConfigError(
            f"config.json: mm_projector_type {projector!r} is not supported: minisail runs Yi-VL's mlp2x_gelu_Norm "
            "(any mlpNx_gelu_Norm), not other LLaVA projectors"
        )
    if flag(config, "mm_use_im_start_end", top, False):
        raise ConfigError("config.json: mm_use_im_start_end = true is not supported (Yi-VL has no image start/end)")
    select_feature = choice(config, "mm_vision_select_feature", top, ("patch", "cls_patch"), "patch")  # upstream's
    select_layer = require(config, "mm_vision_select_layer", top, int)
    source = "config.json: mm_vision_select_layer"
    hidden_state_depth(select_layer, vision.num_layers, embeddings_first=True, tower="CLIP ViT", source=source)
    mm_hidden = positive(config, "mm_hidden_size", top)
    if mm_hidden != vision.hidden_size:
        raise ConfigError(
            f"config.json: mm_hidden_size {mm_hidden} != the vision tower's hidden_size {vision.hidden_size}"
        )
    return YiVLConfig(
        vision=vision,
        llm=llm,
        vision_tower=require(config, "mm_vision_tower", top, str),
        select_layer=select_layer,
        select_feature=select_feature,
        projector_depth=int(match.group(1)),
    )


def open_yivl_tensors(folder: Path, config: dict) -> NamespacedTensors:
    """The main checkpoint's tensors as named, plus the vision folder's under VIT_PREFIX (safetensors or .bin)."""
    vit = vision_folder(folder, config)
    main = open_checkpoint_folder(folder)
    return NamespacedTensors({"": main, VIT_PREFIX: open_checkpoint_folder(vit)}, f"{folder} (+ {vit} as vit.*)")


# --- splicing ---------------------------------------------------------------------------------------------------


def splice_images(input_ids, attention_mask, text_embeds, image_embeds, image_token_id=YIVL_IMAGE_TOKEN_INDEX):
    """Replace every placeholder by its image's rows, then left-pad the rows to one length.

    input_ids, attention_mask [B, T]; text_embeds [B, T, H]; image_embeds [N, T_img, H], one per placeholder in
    reading order (row 0 first). Returns embeds [B, T', H] and attention_mask [B, T'] with T' = the longest
    spliced row; image rows get mask 1, pads (added on the left) mask 0 and zero embeddings.
    """
    slots = input_ids == image_token_id
    if int(slots.sum()) != image_embeds.shape[0]:
        raise PromptError(
            f"the prompt has {int(slots.sum())} image placeholders ({image_token_id}) but {image_embeds.shape[0]} "
            "images were given: Yi-VL takes one image per placeholder"
        )
    if bool((attention_mask[slots] == 0).any()):
        raise PromptError("an image placeholder sits at a padded position (attention_mask 0): fix the padding")
    images = iter(image_embeds.to(text_embeds.dtype))
    rows, masks = [], []
    for b in range(input_ids.shape[0]):
        pieces, piece_masks, start = [], [], 0
        for slot in slots[b].nonzero().flatten().tolist():
            image = next(images)  # [T_img, H]
            pieces += [text_embeds[b, start:slot], image]
            piece_masks += [attention_mask[b, start:slot], attention_mask.new_ones(image.shape[0])]
            start = slot + 1
        pieces.append(text_embeds[b, start:])
        piece_masks.append(attention_mask[b, start:])
        rows.append(torch.cat(pieces))
        masks.append(torch.cat(piece_masks))
    length = max(row.shape[0] for row in rows)
    embeds = text_embeds.new_zeros(len(rows), length, text_embeds.shape[-1])  # [B, T', H]
    mask = attention_mask.new_zeros(len(rows), length)  # [B, T']
    for b, (row, row_mask) in enumerate(zip(rows, masks, strict=True)):
        embeds[b, length - row.shape[0] :] = row
        mask[b, length - row.shape[0] :] = row_mask
    return embeds, mask


# --- the model --------------------------------------------------------------------------------------------------


class YiVLModel(nn.Module):
    def __init__(self, config: YiVLConfig):
        super().__init__()
        self.config = config
        depth = hidden_state_depth(
            config.select_layer, config.vision.num_layers, embeddings_first=True, tower="CLIP ViT"
        )
        self.vision_tower = CLIPVisionTower(config.vision, depth)
        self.projector = LayerNormMLPProjector(
            config.vision.hidden_size, config.llm.hidden_size, config.projector_depth
        )
        self.language_model = Decoder(config.llm)
        self.image_token_id = YIVL_IMAGE_TOKEN_INDEX

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [N, 3, S, S] -> image embeddings [N, tokens_per_image, H] (upstream encode_images)."""
        hidden = self.vision_tower(pixel_values)  # [N, 1 + g*g, C]
        features = hidden[:, 1:] if self.config.select_feature == "patch" else hidden
        return self.projector(features)  # [N, T_img, H]

    def visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """The decoder's FFN routing for `input_ids`: None, a plain Llama has no visual experts."""
        return None

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, H]; placeholder slots get a dummy row (they are replaced by the splice)."""
        placeholders = input_ids == self.image_token_id
        ids = input_ids.masked_fill(placeholders, 0)
        check_vocabulary(ids, self.config.llm.vocab_size)
        return self.language_model.embed(ids)

    def prepare_inputs(self, input_ids, attention_mask=None, pixel_values=None, image_embeds=None) -> PreparedInputs:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        embeds = self.embed_text(input_ids)  # [B, T, H]
        has_placeholder = bool((input_ids == self.image_token_id).any())
        if pixel_values is None and image_embeds is None:
            if has_placeholder:
                raise PromptError("the prompt has an image placeholder (-200) but no pixel_values were given")
            return PreparedInputs(embeds, attention_mask)
        if image_embeds is None:
            image_embeds = self.encode_images(pixel_values)
        embeds, attention_mask = splice_images(input_ids, attention_mask, embeds, image_embeds, self.image_token_id)
        return PreparedInputs(embeds, attention_mask)  # no visual experts: no routing

    def forward(self, input_ids, attention_mask=None, pixel_values=None) -> torch.Tensor:
        """Full forward without cache: float32 logits [B, T', V] over the spliced sequence."""
        inputs = self.prepare_inputs(input_ids, attention_mask, pixel_values)
        positions = positions_from_mask(inputs.attention_mask)
        return self.language_model(inputs.embeds, positions, attention_mask=inputs.attention_mask)
