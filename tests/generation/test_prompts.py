"""chat()-exact prompt assembly against every golden prompt case (tests/data/prompt_cases.json).

Each case is rebuilt from its `inputs` with minisail's API and compared with what the official code built:
the exact text (and its sha256), input_ids and attention_mask, the eos id, and the reply/history that
post-processing gives for the fixed generated ids. Cases where upstream fails must raise a PromptError.
"""

import hashlib
import json
import re
import shutil
import subprocess
import sys

import pytest
from helpers import paths
from helpers.checkpoints import GOLDEN

from minisail.cli import main
from minisail.errors import PromptError, TokenizerError
from minisail.text.image_tokens import IMG_CONTEXT, compact_image_runs
from minisail.text.prompt import (
    YIVL_IMAGE_PLACEHOLDER,
    YIVL_IMAGE_TOKEN_INDEX,
    append_history,
    build_batch_queries,
    build_query,
    build_sailvl2_processor_query,
    build_yivl_query,
    chat_eos_token_id,
    decode_reply,
    encode_queries,
    encode_yivl_query,
    postprocess_reply,
)
from minisail.text.templates import get_template

DATA = json.loads((paths.DATA / "prompt_cases.json").read_text(encoding="utf-8"))
CASES = {case["id"]: case for case in DATA["cases"]}

# golden variant -> (minisail template, image_style)
VARIANTS = {
    "internvl-chat-v1-5": ("internlm2-chat-v1-5", "placeholder"),
    "mono-internvl-2b": ("internlm2-chat", "placeholder"),
    "internvl2_5": ("internvl2_5", "placeholder"),
    "hermes-2": ("Hermes-2", "placeholder"),
    "sail-vl2-2b": ("univl-chat", "placeholder"),
    "mono-internvl-github": ("internlm2-chat", "prefix"),
}


def expand(compact: str) -> str:
    return re.sub(r"<IMG_CONTEXT>\*(\d+)", lambda m: IMG_CONTEXT * int(m[1]), compact)


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def tiles_of(inputs: dict) -> list[int] | None:
    """chat()'s num_patches_list: as passed, else one image of all pixel_values rows, else no image."""
    if inputs.get("image_counts") is not None:
        return inputs["image_counts"]
    if inputs.get("num_patches_list") is not None:
        return inputs["num_patches_list"]
    return None if inputs["pixel_values_tiles"] is None else [inputs["pixel_values_tiles"]]


def history_of(inputs: dict):
    history = inputs["history"]
    return None if history is None else [tuple(turn) for turn in history]


def ids_of(case_ids):
    return pytest.mark.parametrize("case_id", case_ids)


CHAT_CALLS = [
    (case_id, index)
    for case_id, case in CASES.items()
    if case["entry"] in ("chat", "multi_image_chat")
    for index in range(len(case["calls"]))
]


@pytest.mark.parametrize(("case_id", "call_index"), CHAT_CALLS, ids=[f"{c}#{i}" for c, i in CHAT_CALLS])
def test_chat_query_text(case_id, call_index):
    case = CASES[case_id]
    call = case["calls"][call_index]
    template_name, style = VARIANTS[case["variant"]]
    inputs = call["inputs"]
    build = lambda: build_query(  # noqa: E731
        get_template(template_name),
        inputs["question"],
        history=history_of(inputs),
        num_patches_list=tiles_of(inputs),
        image_style=style,
    )
    if "error" in call:
        if case_id == "mono-internvl-github/a_text":
            # Upstream crashes on pixel_values=None; minisail builds the plain text prompt instead.
            assert build().text == expand(CASES["mono-internvl-2b/a_text"]["calls"][0]["query_compact"])
            return
        with pytest.raises(PromptError, match="placeholder"):
            build()
        return
    query = build()
    assert compact_image_runs(query.text) == call["query_compact"]
    assert query.text == expand(call["query_compact"])
    assert sha256(query.text) == call["query_sha256"]
    if "history_out" in call:
        history = history_of(inputs)
        returned = append_history(history, query.question, call["response"])
        assert [[compact_image_runs(q), a] for q, a in returned] == call["history_out"]
        if "history_out_is_input_object" in call:
            assert (returned is history) == call["history_out_is_input_object"]


BATCH_CASES = [case_id for case_id, case in CASES.items() if case["entry"] == "batch_chat"]


@ids_of(BATCH_CASES)
def test_batch_query_texts(case_id):
    case = CASES[case_id]
    call = case["calls"][0]
    template_name, style = VARIANTS[case["variant"]]
    inputs = call["inputs"]
    with_images = inputs["pixel_values_tiles"] is not None
    tiles = inputs.get("num_patches_list") or inputs.get("image_counts")
    queries = build_batch_queries(
        get_template(template_name),
        inputs["questions"],
        num_patches_list=tiles if with_images else None,
        image_style=style,
    )
    assert [q.text for q in queries] == [expand(c) for c in call["queries_compact"]]
    assert [sha256(q.text) for q in queries] == call["queries_sha256"]


PROCESSOR_CASES = [case_id for case_id, case in CASES.items() if case["entry"] == "processor"]


@ids_of(PROCESSOR_CASES)
def test_sailvl2_processor_query_text(case_id):
    call = CASES[case_id]["calls"][0]
    text = build_sailvl2_processor_query(call["inputs"]["messages"], call["inputs"]["image_tiles"])
    assert text == expand(call["query_compact"])
    assert sha256(text) == call["query_sha256"]


def test_sailvl2_processor_image_count_mismatch():
    messages = CASES["sail-vl2-2b/p_two_images"]["calls"][0]["inputs"]["messages"]
    with pytest.raises(PromptError, match="2 image item"):
        build_sailvl2_processor_query(messages, [3])


# --- error cases and decisions beyond the goldens ------------------------------------------------------


def test_empty_history_with_image_explains_the_first_turn_rule():
    with pytest.raises(PromptError, match="history=None"):
        build_query(get_template("internvl2_5"), "What is this?", history=[], num_patches_list=[1])
    # history=[] with an explicit placeholder is fine, exactly as upstream.
    query = build_query(get_template("internvl2_5"), "<image>\nWhat is this?", history=[], num_patches_list=[1])
    assert query.text.count(IMG_CONTEXT) == 256


def test_two_images_one_placeholder_explains_labels():
    with pytest.raises(PromptError, match="Image-1: <image>"):
        build_query(get_template("Hermes-2"), "Compare.", num_patches_list=[3, 5])


def test_second_image_in_a_later_turn_takes_the_next_entry():
    template = get_template("Hermes-2")
    history = [("<image>\nDescribe.", "A panda.")]
    query = build_query(template, "And <image>?", history=history, num_patches_list=[2, 1])
    first, second = query.text.index("<img>"), query.text.rindex("<img>")
    assert query.text[first:].startswith("<img>" + IMG_CONTEXT * 512 + "</img>\nDescribe.")
    assert query.text[second:].startswith("<img>" + IMG_CONTEXT * 256 + "</img>?")


@pytest.mark.parametrize("bad", [[0], [-1], [1.5], [True]])
def test_bad_tile_counts(bad):
    with pytest.raises(PromptError, match="tile counts"):
        build_query(get_template("Hermes-2"), "q", num_patches_list=bad)


@pytest.mark.parametrize("bad", [0, -256, 2.5])
def test_bad_tokens_per_tile(bad):
    with pytest.raises(PromptError, match="tokens_per_tile"):
        build_query(get_template("Hermes-2"), "q", num_patches_list=[1], tokens_per_tile=bad)


def test_placeholder_style_rejects_an_expanded_history():
    expanded = build_query(get_template("Hermes-2"), "Describe.", num_patches_list=[1]).text
    history = [(expanded[expanded.index("<img>") : expanded.index("Describe.") + 9], "A panda.")]
    with pytest.raises(PromptError, match="placeholders, not expanded"):
        build_query(get_template("Hermes-2"), "More?", history=history)


def test_encoding_nothing_is_an_error(qwen25_tokenizer):
    with pytest.raises(PromptError, match="no prompts"):
        encode_queries(qwen25_tokenizer, [])


def test_tokens_per_tile_is_a_parameter():
    query = build_query(get_template("Hermes-2"), "q", num_patches_list=[2], tokens_per_tile=64)
    assert query.text.count(IMG_CONTEXT) == 128


def test_literal_image_text_without_images_stays_text():
    query = build_query(get_template("Hermes-2"), "What does <image> mean in HTML?")
    assert "What does <image> mean in HTML?" in query.text and IMG_CONTEXT not in query.text


def test_prefix_style_later_turn_needs_images_in_history():
    with pytest.raises(PromptError, match="first turn only"):
        build_query(get_template("internlm2-chat"), "q", history=[], num_patches_list=[1], image_style="prefix")


def test_batch_needs_one_tile_count_per_question():
    with pytest.raises(PromptError, match="one tile count per question"):
        build_batch_queries(get_template("Hermes-2"), ["a", "b"], num_patches_list=[1])


def test_yivl_template_is_not_built_as_chatml():
    with pytest.raises(PromptError, match="pick another template") as refused:  # words for the CLI's --template
        build_query(get_template("mm_default"), "q")
    assert "build_yivl_query" in str(refused.value)  # and for Python


def test_unknown_image_style():
    with pytest.raises(PromptError, match="image_style"):
        build_query(get_template("Hermes-2"), "q", image_style="inline")


def test_reply_postprocessing_rules():
    assert postprocess_reply("  Hi there.\n", get_template("internvl2_5")) == "Hi there."
    assert postprocess_reply("Hi<|im_end|> junk", get_template("Hermes-2")) == "Hi"
    assert postprocess_reply(" It is pink.\n###", get_template("mm_default")) == "It is pink."
    assert postprocess_reply("a ### b", get_template("mm_default")) == "a ### b"


def test_append_history_semantics():
    first = append_history(None, "q1", "a1")
    assert first == [("q1", "a1")]
    assert append_history(first, "q2", "a2") is first and first[-1] == ("q2", "a2")


# --- Yi-VL (strings only: no Yi tokenizer is available) ------------------------------------------------

YI_CASES = [case_id for case_id, case in CASES.items() if case["variant"] == "yi-vl"]


def yivl_from_openai(messages):
    """openai_api-style messages as minisail's (question, history, image) call."""
    turns, image = [], False
    for message in messages:
        content = message["content"]
        if message["role"] != "user":
            turns[-1][1] = content
            continue
        if not isinstance(content, str):
            image = image or any(item["type"] == "image_url" for item in content)
            content = next(item["text"] for item in content if item["type"] == "text")
        turns.append([content, None])
    history = [(q, a) for q, a in turns[:-1]]
    if image and history:  # the image went in with the first question, as the first turn of cli.py does
        history[0] = (YIVL_IMAGE_PLACEHOLDER + "\n" + history[0][0], history[0][1])
    return turns[-1][0], history, image


@ids_of(YI_CASES)
def test_yivl_prompt_strings(case_id):
    template = get_template("mm_default")
    history = []
    for call in CASES[case_id]["calls"]:
        assert call["prompt"].split(YIVL_IMAGE_PLACEHOLDER) == call["prompt_chunks"]
        assert call["stop_str"] == template.stop_str
        if case_id.endswith("q_text_list_content_dropped"):
            # Upstream openai_api drops a text-only list message: what remains is an empty conversation.
            assert template.render([(template.roles[1], None)]) == call["prompt"]
            built = build_yivl_query("Hello")
            assert built.text.endswith("### Human: Hello\n### Assistant:")  # minisail keeps the message
            continue
        if "messages" in call:
            question, history, image = yivl_from_openai(call["messages"])
        else:
            question, image = call["question"], True
        query = build_yivl_query(question, history=history, image=image)
        assert query.text == call["prompt"]
        assert query.text.count(YIVL_IMAGE_PLACEHOLDER) == call["n_image_placeholders"]
        if "raw_output" in call:
            response = postprocess_reply(call["raw_output"], template)
            assert response == call["response"]
            history = append_history(history, query.question, response)


def test_yivl_image_rules():
    with pytest.raises(PromptError, match="exactly one image"):
        build_yivl_query(f"{YIVL_IMAGE_PLACEHOLDER} q", image=False)
    with pytest.raises(PromptError, match="exactly one image"):
        build_yivl_query(f"{YIVL_IMAGE_PLACEHOLDER} q", history=[(f"{YIVL_IMAGE_PLACEHOLDER}\nq0", "a0")], image=True)


class _CharTokenizer:
    """A stand-in with the Tokenizer interface: one id per character, optional BOS."""

    def __init__(self, bos):
        self.bos_token_id = bos

    def encode(self, text, *, add_special_tokens=True):
        prefix = [self.bos_token_id] if add_special_tokens and self.bos_token_id is not None else []
        return prefix + [ord(c) for c in text]


@pytest.mark.parametrize("bos", [1, None])
def test_yivl_encoding_splices_image_index(bos):
    tokenizer = _CharTokenizer(bos)
    ids = encode_yivl_query(tokenizer, f"ab{YIVL_IMAGE_PLACEHOLDER}\ncd")
    lead = [] if bos is None else [bos]
    assert ids == lead + [ord("a"), ord("b"), YIVL_IMAGE_TOKEN_INDEX, ord("\n"), ord("c"), ord("d")]
    # a prompt that ends in the placeholder leaves an empty last chunk
    assert encode_yivl_query(tokenizer, f"a{YIVL_IMAGE_PLACEHOLDER}") == lead + [
        ord("a"),
        YIVL_IMAGE_TOKEN_INDEX,
    ]


def test_chat_eos_for_yivl_is_the_tokenizer_eos():
    class _Tok:
        eos_token_id = 2

    assert chat_eos_token_id(_Tok(), get_template("mm_default")) == 2


# --- token ids, eos and replies (the tokenizers come from tests/conftest.py) ----------------------------

TOKENIZER_FIXTURES = {"internlm2": "internlm2_tokenizer", "qwen2.5": "qwen25_tokenizer", "qwen3": "sailvl2_tokenizer"}


def tokenizer_for(request, case):
    return request.getfixturevalue(TOKENIZER_FIXTURES[case["tokenizer"]])


def context_runs(ids, context_id):
    """[start, length] of each run of the image-context id, as the goldens' `img_context_runs`."""
    runs = []
    for position, token_id in enumerate(ids):
        if token_id == context_id:
            if runs and runs[-1][0] + runs[-1][1] == position:
                runs[-1][1] += 1
            else:
                runs.append([position, 1])
    return runs


@pytest.mark.parametrize(("case_id", "call_index"), CHAT_CALLS, ids=[f"{c}#{i}" for c, i in CHAT_CALLS])
def test_chat_ids_eos_and_reply(request, case_id, call_index):
    case = CASES[case_id]
    call = case["calls"][call_index]
    if "input_ids" not in call:  # upstream failed before tokenizing (mono-internvl-github/a_text)
        return
    tokenizer = tokenizer_for(request, case)
    template = get_template(VARIANTS[case["variant"]][0])
    # For error cases the text is the one upstream built; minisail refuses it but must tokenize it the same.
    encoded = encode_queries(tokenizer, expand(call["query_compact"]))
    assert encoded.input_ids.tolist() == [call["input_ids"]]
    assert encoded.attention_mask.tolist() == [call["attention_mask"]]
    assert context_runs(call["input_ids"], tokenizer.token_to_id(IMG_CONTEXT)) == call["img_context_runs"]
    eos = chat_eos_token_id(tokenizer, template)
    assert (
        eos == call["eos_token_id"]
        if "eos_token_id" in call
        else eos == call["generation_config_after"]["eos_token_id"]
    )
    if "generated_ids" in call:
        assert decode_reply(tokenizer, call["generated_ids"], template) == call["response"]


@ids_of(BATCH_CASES)
def test_batch_ids_padding_and_replies(request, case_id):
    case = CASES[case_id]
    call = case["calls"][0]
    tokenizer = tokenizer_for(request, case)
    template = get_template(VARIANTS[case["variant"]][0])
    encoded = encode_queries(tokenizer, [expand(c) for c in call["queries_compact"]])
    assert encoded.input_ids.tolist() == call["input_ids"]
    assert encoded.attention_mask.tolist() == call["attention_mask"]
    assert call["input_ids"][0][0] == tokenizer.pad_token_id  # left padding, the pad before any BOS
    context_id = tokenizer.token_to_id(IMG_CONTEXT)
    assert [context_runs(row, context_id) for row in call["input_ids"]] == call["img_context_runs"]
    assert chat_eos_token_id(tokenizer, template) == call["eos_token_id"]
    assert [decode_reply(tokenizer, ids, template) for ids in call["generated_ids"]] == call["responses"]


@ids_of(PROCESSOR_CASES)
def test_sailvl2_processor_ids_eos_and_reply(request, case_id):
    case = CASES[case_id]
    call = case["calls"][0]
    tokenizer = tokenizer_for(request, case)
    template = get_template("univl-chat")
    text = build_sailvl2_processor_query(call["inputs"]["messages"], call["inputs"]["image_tiles"])
    encoded = encode_queries(tokenizer, text)
    assert encoded.input_ids.tolist() == [call["input_ids"]]
    assert encoded.attention_mask.tolist() == [call["attention_mask"]]
    assert chat_eos_token_id(tokenizer, template) == call["processor_eos_token_id"] == call["eos_token_id"]
    assert decode_reply(tokenizer, call["generated_ids"], template) == call["response"]


def test_encoding_refuses_a_tokenizer_without_image_tokens(qwen25_tokenizer):
    class PlainText:  # the same tokenizer, but <IMG_CONTEXT> unknown (as in a base-LLM tokenizer)
        pad_token_id = qwen25_tokenizer.pad_token_id

        def encode(self, text):
            return qwen25_tokenizer.encode(text)

        def token_to_id(self, token):
            return None

    query = build_query(get_template("Hermes-2"), "q", num_patches_list=[1])
    with pytest.raises(TokenizerError, match="IMG_CONTEXT"):
        encode_queries(PlainText(), query.text)


def test_batch_of_equal_lengths_needs_no_pad(qwen25_tokenizer):
    queries = build_batch_queries(get_template("Hermes-2"), ["same", "same"])
    encoded = encode_queries(qwen25_tokenizer, [q.text for q in queries])
    assert encoded.attention_mask.min().item() == 1 and encoded.input_ids.shape[0] == 2


# --- python -m minisail prompt -------------------------------------------------------------------------


def run_prompt(capsys, *argv):
    code = main(["prompt", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


def test_cli_json_matches_golden(capsys, qwen25_tokenizer_dir):
    call = CASES["internvl2_5/b_image_prepend"]["calls"][0]
    argv = ["--tokenizer", str(qwen25_tokenizer_dir), "--template", "internvl2_5", "--tiles", "7"]
    code, out, _ = run_prompt(capsys, *argv, call["inputs"]["question"], "--json")
    assert code == 0
    result = last_json(out)
    assert result["query"] == expand(call["query_compact"]) and result["input_ids"] == call["input_ids"]
    assert result["eos_token_id"] == call["eos_token_id"] and result["num_patches_list"] == [7]
    assert result["num_tokens"] == len(call["input_ids"]) and result["tokens_per_tile"] == 256


def test_cli_human_output_is_compact(capsys, qwen25_tokenizer_dir):
    argv = ["--tokenizer", str(qwen25_tokenizer_dir), "--template", "Hermes-2", "--tiles", "3", "--tiles", "5"]
    code, out, _ = run_prompt(capsys, *argv, "Image-1: <image>\nImage-2: <image>\nCompare.")
    assert code == 0
    assert "Image-1: <img><IMG_CONTEXT>*768</img>\nImage-2: <img><IMG_CONTEXT>*1280</img>\nCompare." in out
    assert "151667*768" in out and "151667*1280" in out and "151645" in out
    assert IMG_CONTEXT * 2 not in out


def test_cli_history_and_sentencepiece_tokenizer(capsys, tmp_path, internlm2_tokenizer_dir):
    call = CASES["internvl-chat-v1-5/d_history_image"]["calls"][1]
    history = tmp_path / "history.json"
    history.write_text(json.dumps(call["inputs"]["history"]), encoding="utf-8")
    argv = ["--tokenizer", str(internlm2_tokenizer_dir), "--template", "internlm2-chat-v1-5", "--tiles", "4"]
    code, out, _ = run_prompt(capsys, *argv, "--history", str(history), call["inputs"]["question"], "--json")
    assert code == 0 and last_json(out)["input_ids"] == call["input_ids"]


def test_cli_prefix_style(capsys, internlm2_tokenizer_dir):
    call = CASES["mono-internvl-github/b_image_explicit_lead"]["calls"][0]
    argv = ["--tokenizer", str(internlm2_tokenizer_dir), "--template", "internlm2-chat", "--tiles", "7"]
    code, out, _ = run_prompt(capsys, *argv, "--image-style", "prefix", call["inputs"]["question"], "--json")
    assert code == 0 and last_json(out)["input_ids"] == call["input_ids"]


def test_cli_system_override(capsys, qwen25_tokenizer_dir):
    argv = ["--tokenizer", str(qwen25_tokenizer_dir), "--template", "internvl2_5", "--system", "Be brief."]
    code, out, _ = run_prompt(capsys, *argv, "Hi", "--json")
    assert code == 0 and last_json(out)["query"].startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def checkpoint_folder(tmp_path, tokenizer_dir, config):
    folder = tmp_path / "checkpoint"
    shutil.copytree(tokenizer_dir, folder)
    (folder / "config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    return folder


def sailvl2_config(image_size: int = 448, **top) -> dict:
    """The golden SAIL-VL2 config.json (the prompt command checks the whole config, as load does) at `image_size`."""
    config = json.loads((GOLDEN / "sail-vl2-tiny" / "checkpoint" / "config.json").read_text(encoding="utf-8"))
    config["vision_config"]["image_size"] = image_size
    return {**config, "force_image_size": image_size, **top}


def test_cli_model_folder(capsys, tmp_path, sailvl2_tokenizer_dir):
    call = CASES["sail-vl2-2b/c_two_images"]["calls"][0]
    folder = checkpoint_folder(tmp_path, sailvl2_tokenizer_dir, sailvl2_config())
    argv = ["--model", str(folder), "--tiles", "3", "--tiles", "5", call["inputs"]["question"], "--json"]
    code, out, _ = run_prompt(capsys, *argv)
    assert code == 0
    result = last_json(out)
    assert result["template"] == "univl-chat" and result["input_ids"] == call["input_ids"]
    assert result["eos_token_id"] == call["eos_token_id"]


def test_cli_model_folder_system_message_and_tokens_per_tile(
    capsys, tmp_path, sailvl2_tokenizer_dir, qwen25_tokenizer_dir
):
    # SAIL-VL2's chat() uses its template's system message whatever config.json says (modeling_sailvl.py:
    # self.system_message = self.conv_template.system_message): the prompt command shows what chat() sends
    folder = checkpoint_folder(tmp_path, sailvl2_tokenizer_dir, sailvl2_config(224, system_message="Be brief."))
    code, out, _ = run_prompt(capsys, "--model", str(folder), "--tiles", "2", "Hi", "--json")
    result = last_json(out)
    assert code == 0 and result["tokens_per_tile"] == 64 and result["query"].count(IMG_CONTEXT) == 128
    system = get_template("univl-chat").system_message
    assert result["query"].startswith(f"<|im_start|>system\n{system}<|im_end|><|im_start|>user\n<img>")
    # InternVL's chat() reads config.system_message: there the command shows the config's
    config = json.loads((GOLDEN / "internvl-qwen2-textonly" / "checkpoint" / "config.json").read_text(encoding="utf-8"))
    folder = checkpoint_folder(tmp_path / "internvl", qwen25_tokenizer_dir, {**config, "system_message": "Be brief."})
    code, out, _ = run_prompt(capsys, "--model", str(folder), "Hi", "--json")
    assert code == 0 and last_json(out)["query"].startswith("<|im_start|>system\nBe brief.<|im_end|>")


def test_cli_yivl_splices_the_image_index(capsys, internlm2_tokenizer_dir):
    # No Yi tokenizer is available; a SentencePiece one with BOS exercises the same path.
    argv = ["--tokenizer", str(internlm2_tokenizer_dir), "--template", "mm_default", "--tiles", "1", "Hi", "--json"]
    code, out, _ = run_prompt(capsys, *argv)
    result = last_json(out)
    assert code == 0 and result["query"].endswith("### Human: <image_placeholder>\nHi\n### Assistant:")
    assert result["input_ids"][0] == 1 and result["input_ids"].count(YIVL_IMAGE_TOKEN_INDEX) == 1
    assert result["input_ids"].count(1) == 1 and result["eos_token_id"] == 2


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--template", "sailvl-chat", "--tokenizer", "{tok}", "q"], "known templates: Hermes-2"),
        (["--template", "Hermes-2", "--tokenizer", "{missing}", "q"], "does not exist"),
        (["--model", "{missing}", "q"], "does not exist"),
        (["--model", "{nokey}", "q"], "no 'template' key"),
        (["--model", "{badconfig}", "q"], "hidden_act 'gelu' is not supported"),
        (["--template", "Hermes-2", "q"], "--model DIR, or both"),
        (["--template", "Hermes-2", "--tokenizer", "{tok}", "--tiles", "3", "--tiles", "5", "q"], "Image-1: <image>"),
        (["--template", "Hermes-2", "--tokenizer", "{tok}", "--tiles", "0", "q"], "--tiles must be between 1 and 1025"),
        (["--template", "Hermes-2", "--tokenizer", "{tok}", "--tiles", "100000000", "q"], "not 100000000"),
        (["--template", "Hermes-2", "--tokenizer", "{tok}", "--history", "{badhistory}", "q"], "[question, answer]"),
        (["--template", "mm_default", "--tokenizer", "{tok}", "--tiles", "3", "q"], "--tiles 1"),
        (["--template", "Hermes-2", "--tokenizer", "{tok}", "--tokens-per-tile", "0", "q"], "between 1 and 1048576"),
        (["--template", "Hermes-2", "--tokenizer", "{tok}", "--tokens-per-tile", "100000000", "q"], "not 100000000"),
        (["--template", "Hermes-2", "--tokenizer", "{tok}", *["--tiles", "1025"] * 5, "q"], "more than the 1048576"),
        (["--template", "Hermes-2", "--tokenizer", "{tok}", "--history", "{missing}", "q"], "does not exist"),
    ],
)
def test_cli_errors(capsys, tmp_path, qwen25_tokenizer_dir, argv, message):
    no_template = {k: v for k, v in sailvl2_config().items() if k != "template"}
    nokey = checkpoint_folder(tmp_path, qwen25_tokenizer_dir, no_template)
    bad_history = tmp_path / "history.json"
    bad_history.write_text('[["only a question"]]', encoding="utf-8")
    bad = sailvl2_config()
    bad["llm_config"] = {**bad["llm_config"], "hidden_act": "gelu"}  # refused by minisail.load: refused here too
    badconfig = checkpoint_folder(tmp_path / "bad", qwen25_tokenizer_dir, bad)
    paths = {"tok": qwen25_tokenizer_dir, "missing": tmp_path / "nowhere", "nokey": nokey, "badhistory": bad_history}
    paths["badconfig"] = badconfig
    code, out, err = run_prompt(capsys, *[a.format(**paths) for a in argv])
    assert code == 2 and out == ""
    assert err.startswith("minisail: error: ") and message in err and "Traceback" not in err


def test_cli_runs_as_a_module_and_exits_2_on_user_errors():
    command = [sys.executable, "-m", "minisail", "prompt", "--template", "nope", "--tokenizer", ".", "q"]
    done = subprocess.run(command, capture_output=True, text=True, cwd=paths.ROOT)
    assert done.returncode == 2 and "unknown conversation template 'nope'" in done.stderr
    assert "Traceback" not in done.stderr
