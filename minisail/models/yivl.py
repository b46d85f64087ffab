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

This is the Yi-VL family module (models/registry.py). Its checkpoint side (two folders: config.json and the
vision tower's `vit/<name>/`, the config, the weight map) is models/yivl_checkpoint.py; its chat side is below:
no chat() upstream, so it follows Yi's `VL/single_inference.py` (one untiled image per conversation, spliced in
as id -200, the `mm_default` template).

Batches: upstream splices every row, then right-pads the rows to one length, and at inference (labels=None)
that branch fails (it reads `_new_labels`, defined only for training); rows of equal spliced length get the
mask [original mask, ones]. minisail splices every row and **left**-pads the spliced rows with zero embeddings
(mask 0): identical to upstream whenever upstream runs (left-padded rows of equal spliced length), and what the
shared KV-cache generation expects (every row's last real token at the end). Images are matched to
placeholders in order, row 0 first; unlike upstream, a row without a placeholder consumes no image.
"""

from __future__ import annotations

import torch
from torch import nn

from minisail.chat import ChatMixin
from minisail.errors import PromptError
from minisail.image.preprocess import yivl_pixel_values
from minisail.llm.decoder import Decoder, positions_from_mask
from minisail.merge import LayerNormMLPProjector
from minisail.models import yivl_checkpoint
from minisail.models.internvl import PreparedInputs, check_vocabulary
from minisail.models.yivl_checkpoint import YiVLConfig
from minisail.text.prompt import YIVL_IMAGE_TOKEN_INDEX, Query, build_yivl_query, encode_yivl_query
from minisail.text.templates import Template, template_for_config
from minisail.vision.clip_vit import CLIPVisionTower
from minisail.whole_model import WholeModelRefusals

NAME = "yi-vl"


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


class YiVLModel(ChatMixin, WholeModelRefusals, nn.Module):
    family = NAME

    def __init__(self, config: YiVLConfig):
        super().__init__()
        self.config = config
        self.vision_tower = CLIPVisionTower(config.vision, config.vision_depth)
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


# --- the family: CLIP ViT-H + mlp2x_gelu_Norm + Yi (Llama), a LLaVA checkpoint with its tower in vit/<name>/ -------


def detect(config: dict) -> bool:
    # transformers' own llava configs (the "-hf" conversions) nest a text_config instead of the mm_* keys
    return config.get("model_type") == "llava" and "mm_vision_tower" in config and "text_config" not in config


parse = yivl_checkpoint.parse
layer_counts = yivl_checkpoint.layer_counts
complete_config = yivl_checkpoint.complete_config
open_tensors = yivl_checkpoint.open_tensors


def build(parsed: YiVLConfig) -> YiVLModel:
    return YiVLModel(parsed)


weight_map = yivl_checkpoint.weight_map


def check_dtype(dtype: torch.dtype) -> None:
    """Every float dtype runs."""


def pixel_values(image, parsed: YiVLConfig, min_tiles: int, max_tiles: int) -> torch.Tensor:
    """One image as Yi's single_inference.py feeds it: padded to a square, resized, [1, 3, S, S] (no tiles)."""
    return yivl_pixel_values(image, image_size=parsed.image_size)


def chat_template(parsed: YiVLConfig) -> Template:
    return template_for_config({"template": parsed.template})


def _left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    input_ids = torch.tensor([[pad_id] * (width - len(row)) + row for row in rows])
    attention_mask = torch.tensor([[0] * (width - len(row)) + [1] * len(row) for row in rows])
    return input_ids, attention_mask


def encode_prompt(model, tokenizer, pixel_values, questions: list[str], *, history, num_patches_list,
                  template: Template, batch: bool) -> tuple[list[Query], torch.Tensor, torch.Tensor]:  # fmt: skip
    """(queries, input_ids [B, T], attention_mask [B, T]): `<image_placeholder>\\n` on the first user turn, the
    chunks around it tokenized apart and joined with -200, rows left-padded. One image per question or none."""
    images = 0 if pixel_values is None else pixel_values.shape[0]
    if images not in (0, len(questions)):
        raise PromptError(f"Yi-VL takes one image per conversation (per question in a batch), not {images}")
    queries = [build_yivl_query(q, history=history, image=images > 0, template=template) for q in questions]
    rows = [encode_yivl_query(tokenizer, query.text) for query in queries]
    input_ids, attention_mask = _left_pad(rows, tokenizer.pad_token_id or 0)
    return queries, input_ids, attention_mask


def add_image_placeholders(question: str, images_before: int, new_images: int) -> str:
    """The question unchanged (build_yivl_query places the image); a second image in a conversation is refused."""
    if images_before + new_images > 1:
        raise PromptError(
            "Yi-VL takes one image per conversation: start a new one for another (Session.reset(), /reset in chat)"
        )
    return question
