"""The golden-case runner behind `python -m minisail parity CASE_DIR ...`.

A case directory (format: tests/golden/README.md) holds an official-layout `checkpoint/`, `inputs.safetensors`,
`expected.safetensors` (logits, generated_ids, vision_embeds) and `meta.json`, all produced by the upstream
model code. The runner loads `checkpoint/` with `minisail.load` exactly as a user would, then:

- logits of the full forward (no cache), compared only where attention_mask is 1;
- vision_embeds (the image rows right before they enter the LLM), where the case has them;
- greedy decoding with the KV cache for K tokens, compared token for token.

A case passes when both max abs differences are within `tolerance` (1e-4 in float32) and every token matches.
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from minisail.checkpoint.safetensors_mmap import SafetensorsFile
from minisail.errors import CheckpointError, MinisailError

# float32 cases: the official numbers to ~1e-5. A case recorded in bfloat16 (tests/tools/record_golden.py
# --dtype bfloat16) only agrees to bf16 rounding: minisail's SDPA and the official eager attention round at
# different points, so its default gate is loose; record in float32 for a logit-for-logit check.
DEFAULT_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-1}


@dataclass
class CaseResult:
    case: str
    logits_max_abs_diff: float
    vision_max_abs_diff: float | None
    tokens_equal: bool
    expected_tokens: list
    generated_tokens: list
    passed: bool
    tolerance: float | None
    seconds: float
    error: str | None = None  # why the case could not run (a minisail error), then nothing above was measured

    @classmethod
    def failed_to_run(cls, case_dir: str | Path, error: Exception, seconds: float) -> CaseResult:
        name = Path(case_dir).name
        return cls(name, math.nan, None, False, [], [], False, None, seconds, f"{type(error).__name__}: {error}")

    def line(self) -> str:
        if self.error is not None:
            return f"FAIL {self.case}: could not run: {self.error}"
        vision = "-" if self.vision_max_abs_diff is None else f"{self.vision_max_abs_diff:.2e}"
        verdict = "PASS" if self.passed else "FAIL"
        return (
            f"{verdict} {self.case}: logits max|diff| {self.logits_max_abs_diff:.2e}, vision max|diff| {vision}, "
            f"tokens {'equal' if self.tokens_equal else 'DIFFER'} ({len(self.expected_tokens[0])} per row), "
            f"{self.seconds:.1f}s"
        )

    def to_json(self) -> dict:
        """The fields as standard JSON: a difference that is not a finite number (NaN logits) is null."""
        fields = asdict(self)
        for key, value in fields.items():
            if isinstance(value, float) and not math.isfinite(value):
                fields[key] = None
        return fields


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: a golden case needs inputs.safetensors and expected.safetensors")
    file = SafetensorsFile(path)
    return {name: file.read(name) for name in file.entries}


def image_token_id(meta: dict) -> int | None:
    tokens = meta.get("image_tokens") or {}
    for key in ("IMG_CONTEXT_id", "image_token_index", "placeholder_id"):
        if isinstance(tokens.get(key), int):
            return tokens[key]
    # The SAIL-VL2 and Mono cases name it under "tokens", e.g. "IMG_CONTEXT (<IMG_CONTEXT>)": 388.
    for key, value in (meta.get("tokens") or {}).items():
        if key.startswith("IMG_CONTEXT") and isinstance(value, int):
            return value
    # The Yi-VL cases describe LLaVA's placeholder in prose: "... IMAGE_TOKEN_INDEX = -200 in input_ids ..."
    found = re.search(r"IMAGE_TOKEN_INDEX\s*=\s*(-?\d+)", str(meta.get("image_token", "")))
    return int(found.group(1)) if found else None


def read_meta(case_dir: Path) -> dict:
    path = case_dir / "meta.json"
    if not path.is_file():
        return {}
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{path} is not valid JSON ({error})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return meta


def need(tensors: dict, name: str, path: Path) -> torch.Tensor:
    if name not in tensors:
        raise CheckpointError(f"{path} has no tensor {name!r} (see tests/golden/README.md for the case format)")
    return tensors[name]


def check_case_shapes(case_dir: Path, inputs: dict, expected: dict, context: int) -> None:
    """Refuse a case whose arrays disagree with each other or with the model before anything runs.

    The runner sizes its work from the arrays (greedy decoding allocates a KV cache for every expected
    token), so a `generated_ids` of shape [0, 10**7] would allocate gigabytes. Checked: input_ids and
    attention_mask are [B, T] with the same shape, B >= 1, generated_ids is [B, K], T and K are each between
    1 and the model's context, logits is [B, *, V]. (T + K may pass the context: the dynamic-NTK golden case
    decodes past max_position_embeddings on purpose, which is why greedy_generate does not limit it.)
    """
    inputs_path, expected_path = case_dir / "inputs.safetensors", case_dir / "expected.safetensors"

    def shape(tensors: dict, name: str, path: Path, dims: int) -> tuple[int, ...]:
        found = tuple(need(tensors, name, path).shape)
        if len(found) != dims:
            raise CheckpointError(f"{path}: {name} has shape {list(found)}, expected {dims} dimensions")
        return found

    batch, length = shape(inputs, "input_ids", inputs_path, 2)
    if shape(inputs, "attention_mask", inputs_path, 2) != (batch, length):
        mask = list(inputs["attention_mask"].shape)
        raise CheckpointError(f"{inputs_path}: attention_mask has shape {mask} but input_ids {[batch, length]}")
    if not 1 <= batch or not 1 <= length <= context:
        raise CheckpointError(
            f"{inputs_path}: input_ids has shape {[batch, length]}; a case needs at least one row and 1 to "
            f"{context} tokens (the model's context)"
        )
    rows, new_tokens = shape(expected, "generated_ids", expected_path, 2)
    if rows != batch or not 1 <= new_tokens <= context:
        raise CheckpointError(
            f"{expected_path}: generated_ids has shape {[rows, new_tokens]}; with input_ids {[batch, length]} it "
            f"must be [{batch}, K] with 1 <= K <= {context} (the model's context)"
        )
    logits = shape(expected, "logits", expected_path, 3)
    if logits[0] != batch:
        raise CheckpointError(f"{expected_path}: logits has shape {list(logits)} but input_ids {batch} rows")


def run_case_or_report(case_dir: str | Path, *, tolerance: float | None = None, tp=None) -> CaseResult:
    """`run_case`, with a case that cannot run (a minisail error: a missing file, a corrupt checkpoint, non-finite
    logits) reported as a failed result naming it, so that the other cases of a run still run and report."""
    start = time.perf_counter()
    try:
        return run_case(case_dir, tolerance=tolerance, tp=tp)
    except MinisailError as error:
        return CaseResult.failed_to_run(case_dir, error, time.perf_counter() - start)


def run_case(case_dir: str | Path, *, tolerance: float | None = None, tp=None) -> CaseResult:
    """Run one case; `tp`: tensor parallel over the ranks of torch.distributed (`minisail.load`'s `tp`)."""
    from minisail import load
    from minisail.generate import context_length, greedy_generate

    case_dir = Path(case_dir)
    start = time.perf_counter()
    meta = read_meta(case_dir)
    inputs = read_tensors(case_dir / "inputs.safetensors")
    expected = read_tensors(case_dir / "expected.safetensors")
    # Cases are float32 unless their meta.json says they were recorded in bfloat16 (tests/tools/record_golden.py).
    dtype = torch.bfloat16 if str(meta.get("dtype", "")).startswith("bfloat16") else torch.float32
    tolerance = DEFAULT_TOLERANCE[dtype] if tolerance is None else tolerance
    model = load(case_dir / "checkpoint", dtype=dtype, tp=tp)
    token_id = image_token_id(meta)
    if token_id is not None and model.image_token_id is None:
        model.image_token_id = token_id
    if model.image_token_id is None and "pixel_values" in inputs:
        missing = "is missing" if not (case_dir / "meta.json").is_file() else "does not name it"
        raise CheckpointError(
            f"{case_dir / 'meta.json'} {missing}: a case with images needs it for the image token id "
            "(the golden checkpoints carry no tokenizer; see tests/golden/README.md)"
        )

    inputs_path, expected_path = case_dir / "inputs.safetensors", case_dir / "expected.safetensors"
    input_ids, attention_mask = need(inputs, "input_ids", inputs_path), need(inputs, "attention_mask", inputs_path)
    pixel_values = inputs.get("pixel_values")
    check_case_shapes(case_dir, inputs, expected, context_length(model.language_model.config))
    with torch.inference_mode():
        logits = model(input_ids, attention_mask, pixel_values)
        real = attention_mask.bool()
        if real.shape != logits.shape[:2]:  # LLaVA (Yi-VL) splices image rows in: compare over the spliced mask
            real = model.prepare_inputs(input_ids, attention_mask, pixel_values).attention_mask.bool()
        expected_logits = need(expected, "logits", expected_path)
        if logits.shape != expected_logits.shape:
            raise CheckpointError(
                f"{case_dir.name}: logits shape {tuple(logits.shape)} != {tuple(expected_logits.shape)}"
            )
        logits_diff = (logits - expected_logits).abs()[real].max().item()

        vision_diff = None
        if "vision_embeds" in expected and pixel_values is not None:
            vision = model.encode_images(pixel_values)
            vision_diff = (vision.float() - expected["vision_embeds"]).abs().max().item()

        want = need(expected, "generated_ids", expected_path)
        got = greedy_generate(model, input_ids, attention_mask, pixel_values, max_new_tokens=want.shape[1])
    tokens_equal = got.shape == want.shape and bool((got == want).all())
    passed = logits_diff <= tolerance and (vision_diff is None or vision_diff <= tolerance) and tokens_equal
    return CaseResult(
        case=case_dir.name,
        logits_max_abs_diff=logits_diff,
        vision_max_abs_diff=vision_diff,
        tokens_equal=tokens_equal,
        expected_tokens=want.tolist(),
        generated_tokens=got.tolist(),
        passed=passed,
        tolerance=tolerance,
        seconds=time.perf_counter() - start,
    )
