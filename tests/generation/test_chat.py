"""chat() / batch_chat() / Session end to end on a tiny random model with the real Qwen2.5 tokenizer and a real image.

The checkpoint is the official InternVL / SAIL-VL-2B layout (InternViT + mlp1 + Qwen2) at toy sizes, but with
vocab_size = len(tokenizer) = 151674, so the real tokenizer, template and image tokens drive it. Tiles are
56 px (4 image tokens each), so the 13 tiles of a real photo stay cheap.
"""

from __future__ import annotations

import json
import shutil
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers.chat_checkpoint import CONTEXT, IMAGE, build_chat_checkpoint
from helpers.checkpoints import GOLDEN
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

import minisail
from minisail.chat import ChatPrompt, batch_chat, chat, prepare_chat
from minisail.errors import ConfigError, MinisailWarning, PromptError
from minisail.generate import greedy_generate
from minisail.image.preprocess import internvl_pixel_values
from minisail.session import Session, tile_limits
from minisail.text.prompt import build_query, decode_reply, encode_queries, postprocess_reply
from minisail.text.replies import THINK_INSTRUCTION, ReplyStream, ThoughtReply, boxed_content, split_thinking
from minisail.text.templates import get_template

IM_END = 151645  # <|im_end|>, the eos chat() uses with a chatml template


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_chat_checkpoint(tmp_path_factory.mktemp("chat") / "ckpt")


@pytest.fixture(scope="module")
def loaded(checkpoint):
    model, tokenizer = minisail.load(checkpoint), minisail.load_tokenizer(checkpoint)
    assert len(tokenizer) == model.config.llm.vocab_size
    return model, tokenizer


@pytest.fixture(scope="module")
def pixel_values():
    return internvl_pixel_values(IMAGE, max_tiles=12, image_size=56)


def expected_reply(model, tokenizer, question, *, history=None, tiles=(), pixel_values=None, max_new_tokens=8):
    """The reply computed without minisail.chat: text helpers, greedy ids, cut after eos, decode, strip."""
    template = get_template("internvl2_5")
    query = build_query(template, question, history=history, num_patches_list=list(tiles), tokens_per_tile=4)
    encoded = encode_queries(tokenizer, query.text)
    model.image_token_id = tokenizer.token_to_id("<IMG_CONTEXT>")
    ids = greedy_generate(model, encoded.input_ids, encoded.attention_mask, pixel_values, max_new_tokens=max_new_tokens)
    ids = ids[0].tolist()
    ids = ids[: ids.index(IM_END) + 1] if IM_END in ids else ids
    return decode_reply(tokenizer, ids, template)


def test_chat_returns_the_greedy_reply_and_history_like_upstream(loaded, pixel_values):
    model, tokenizer = loaded
    config = dict(max_new_tokens=8, do_sample=False)
    question = "What animal is this?"
    response, history = chat(model, tokenizer, pixel_values, question, config, return_history=True)
    assert response == expected_reply(model, tokenizer, question, tiles=[len(pixel_values)], pixel_values=pixel_values)
    assert config == dict(max_new_tokens=8, do_sample=False, eos_token_id=IM_END)  # written into the caller's dict
    assert history == [("<image>\n" + question, response)]

    # turn 2: history given, so no <image>\n is prepended; the returned list is the caller's, extended
    follow_up = "And its colour?"
    response2, history2 = chat(model, tokenizer, pixel_values, follow_up, config, history=history, return_history=True)
    assert history2 is history and history[1] == (follow_up, response2)
    assert response2 == expected_reply(
        model, tokenizer, follow_up, history=history[:1], tiles=[len(pixel_values)], pixel_values=pixel_values
    )
    # text only, as a method like upstream's model.chat
    text_reply = model.chat(tokenizer, None, "Hello, who are you?", dict(max_new_tokens=8))
    assert text_reply == expected_reply(model, tokenizer, "Hello, who are you?")


def test_batch_chat_answers_each_question_like_chat(loaded, pixel_values):
    model, tokenizer = loaded
    one = internvl_pixel_values(IMAGE, max_tiles=1, image_size=56)
    questions = ["Describe the image.", "这是什么动物？请详细说明。"]
    responses = batch_chat(model, tokenizer, torch.cat([pixel_values, one]), questions, dict(max_new_tokens=8),
                           num_patches_list=[len(pixel_values), 1])  # fmt: skip
    assert responses == [
        chat(model, tokenizer, pixel_values, questions[0], dict(max_new_tokens=8)),
        chat(model, tokenizer, one, questions[1], dict(max_new_tokens=8)),
    ]
    with pytest.raises(PromptError, match="history"):
        batch_chat(model, tokenizer, None, questions, {}, history=[])


def test_chat_checks_tiles_against_pixel_values(loaded, pixel_values):
    model, tokenizer = loaded
    with pytest.raises(PromptError, match="adds up to"):
        chat(model, tokenizer, pixel_values, "Hi", {}, num_patches_list=[1])
    with pytest.raises(PromptError, match="standard"):
        chat(model, tokenizer, pixel_values, "Hi", {}, IMG_CONTEXT_TOKEN="<ctx>")


def test_session_streams_the_same_reply_and_keeps_the_conversation(loaded, pixel_values):
    model, tokenizer = loaded
    session = Session(model, tokenizer, generation=minisail.generate.GenerationConfig(max_new_tokens=8))
    question = "What animal is this?"
    pieces = list(session.ask(question, images=[IMAGE], stream=True))
    assert "".join(pieces) == chat(model, tokenizer, pixel_values, question, dict(max_new_tokens=8))
    assert session.history == [("<image>\n" + question, "".join(pieces))]

    # a second image later: it gets its own <image> in the new question, and both images go to the model
    reply = session.ask("And this one?", images=[IMAGE])
    assert session.history[1] == ("<image>\nAnd this one?", reply)
    both = torch.cat([pixel_values, pixel_values])
    assert reply == chat(model, tokenizer, both, "<image>\nAnd this one?", dict(max_new_tokens=8),
                         history=session.history[:1], num_patches_list=[len(pixel_values)] * 2)  # fmt: skip
    session.reset()
    assert session.history == []


def test_session_think_appends_the_instruction_and_splits_the_reply(loaded):
    model, tokenizer = loaded
    session = Session(model, tokenizer)
    reply = session.ask("What is 1+1?", think=True, max_new_tokens=6)
    assert session.history[0][0] == "What is 1+1?" + THINK_INSTRUCTION  # no space between, as the model card
    assert reply.text == session.history[0][1] and reply == split_thinking(reply.text)
    events = list(Session(model, tokenizer).ask("What is 1+1?", think=True, stream=True, max_new_tokens=6))
    assert "".join(text for kind, text in events if kind == "answer") == reply.response


def test_session_sampling_is_reproducible(loaded):
    model, tokenizer = loaded
    ask = lambda seed: Session(model, tokenizer).ask("Tell a story.", temperature=1.5, seed=seed, max_new_tokens=6)
    assert ask(7) == ask(7)
    assert ask(7) != ask(8)


def test_session_rejects_a_prompt_longer_than_the_context(loaded):
    model, tokenizer = loaded
    with pytest.raises(PromptError, match=f"context holds {CONTEXT}"):
        Session(model, tokenizer).ask("word " * CONTEXT)


# --- thinking replies and the reply stream ------------------------------------------------------------------------


REPLY = " <think>\nLet me add: 1 + 1 = 2.\n</think>\n\nThe sum is \\boxed{\\frac{4}{2}} = 2. \n"


def test_split_thinking_and_boxed():
    reply = split_thinking(REPLY)
    assert reply.reasoning == "Let me add: 1 + 1 = 2."
    assert reply.response == "The sum is \\boxed{\\frac{4}{2}} = 2."
    assert reply.answer == "\\frac{4}{2}"
    assert split_thinking("Just 2.") == ThoughtReply("Just 2.", "", "Just 2.", "Just 2.")
    assert split_thinking("<think>cut off").reasoning == "cut off"
    assert boxed_content("\\boxed{a} then \\boxed{b{c}}") == "b{c}"
    assert boxed_content("\\boxed{a} and \\boxed{unclosed") == "a"
    assert boxed_content("no box") is None


@pytest.mark.parametrize("size", [1, 2, 5, 100])
def test_reply_stream_joins_to_the_split_reply(size):
    stream = ReplyStream(["<|im_end|>"], think=True)
    events = []
    for i in range(0, len(REPLY), size):
        events += stream.feed(REPLY[i : i + size])
    events += stream.finish()
    joined = {kind: "".join(t for k, t in events if k == kind) for kind in ("reasoning", "answer")}
    reply = split_thinking(REPLY)
    assert joined == {"reasoning": reply.reasoning, "answer": reply.response}
    assert [kind for kind, _ in events] == sorted((kind for kind, _ in events), key=["reasoning", "answer"].index)
    assert not any("<" in text and "think" in text for _, text in events)


def test_reply_stream_cuts_at_a_stop_string_split_across_pieces():
    stream = ReplyStream(["###"])
    events = []
    for piece in [" Two cats", " #", "#", "# Human: more"]:
        events += stream.feed(piece)
    events += stream.finish()
    assert "".join(text for _, text in events) == "Two cats"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="#ab \n", max_size=24), st.lists(st.integers(1, 6), max_size=12))
def test_yivl_reply_stream_joins_to_the_reply_chat_returns(text, sizes):
    # Yi-VL's reply (postprocess_reply): stripped, one trailing "###" dropped, stripped; text after an inner "###"
    # stays (a stop token such as "####" or "###Human" ends generation with it). The stream shows that same text.
    template = get_template("mm_default")
    stream, events, start = ChatPrompt([], None, None, None, template, 0).reply_stream(), [], 0
    for size in [*sizes, len(text)]:
        events += stream.feed(text[start : start + size])
        start += size
    events += stream.finish()
    assert "".join(piece for _, piece in events) == postprocess_reply(text, template)


def test_reply_parsing_is_still_importable_from_session():
    from minisail import session
    from minisail.text import replies

    for name in ("THINK_INSTRUCTION", "THINK_OPEN", "THINK_CLOSE", "ThoughtReply", "ReplyStream", "split_thinking"):
        assert getattr(session, name) is getattr(replies, name)
    assert session.boxed_content is replies.boxed_content


# --- family details -----------------------------------------------------------------------------------------------


def test_tile_limits_follow_preprocessor_config_then_the_override(tmp_path):
    model = SimpleNamespace(config=SimpleNamespace(min_dynamic_patch=1, max_dynamic_patch=12), checkpoint_folder=None)
    assert tile_limits(model) == (1, 12)
    (tmp_path / "preprocessor_config.json").write_text('{"max_dynamic_patch": 10, "image_size": 448}')
    model.checkpoint_folder = tmp_path
    assert tile_limits(model) == (1, 10)  # SAIL-VL2: the processor's 10, not config.json's 12
    assert tile_limits(model, max_tiles=4) == (1, 4)
    (tmp_path / "preprocessor_config.json").write_text('{"max_dynamic_patch": null}')
    assert tile_limits(model) == (1, 12)  # null: not given


@pytest.mark.parametrize("value", ['"12"', "0", "3.5", "true", "5000"])
def test_a_bad_tile_bound_in_preprocessor_config_names_the_file_and_key(tmp_path, value):
    model = SimpleNamespace(
        config=SimpleNamespace(min_dynamic_patch=1, max_dynamic_patch=12), checkpoint_folder=tmp_path
    )
    (tmp_path / "preprocessor_config.json").write_text(f'{{"max_dynamic_patch": {value}}}')
    with pytest.raises(ConfigError, match=r"preprocessor_config.json: max_dynamic_patch = .* is not a whole number"):
        tile_limits(model)


class CharTokenizer:
    """A stand-in for Yi's tokenizer (not available here): one id per character, eos 2, no BOS."""

    bos_token_id, pad_token_id, eos_token_id = None, None, 2

    def encode(self, text):
        return [ord(c) % 300 + 3 for c in text]

    def decode(self, ids, *, skip_special_tokens=False):
        return "".join(chr(i - 3) for i in ids if i >= 3)

    def token_to_id(self, token):
        return None


def test_yivl_chat_splices_the_image_and_stops_on_its_separator():
    model = minisail.load(GOLDEN / "yi-vl-tiny" / "checkpoint", dtype=torch.float32)
    tokenizer = CharTokenizer()
    pixel_values = load_file(GOLDEN / "yi-vl-tiny" / "inputs.safetensors")["pixel_values"]
    prompt = prepare_chat(model, tokenizer, pixel_values, "What is it?")
    assert prompt.input_ids[0].tolist().count(-200) == 1  # <image_placeholder> -> one spliced image
    assert prompt.queries[0].question == "<image_placeholder>\nWhat is it?"
    assert prompt.generation_config({}).stop_strings == ["###"] and prompt.eos_token_id == 2
    response, history = chat(model, tokenizer, pixel_values, "What is it?", dict(max_new_tokens=6), return_history=True)
    ids = greedy_generate(model, prompt.input_ids, prompt.attention_mask, pixel_values, max_new_tokens=6)[0].tolist()
    ids = ids[: ids.index(2) + 1] if 2 in ids else ids
    assert response == tokenizer.decode(ids).strip().removesuffix("###").strip()
    assert history == [("<image_placeholder>\nWhat is it?", response)]
    with pytest.raises(PromptError, match="one image"):
        chat(model, tokenizer, torch.cat([pixel_values] * 2), "Two?", {})


@pytest.mark.parametrize(
    ("case", "template"),
    [
        ("internvl-internlm2-tiny", "internlm2-chat-v1-5"),  # V1-5 layout: the English InternLM system message
        ("mono-internvl-tiny", "internlm2-chat"),
        ("internvl-qwen2-tiny", "internvl2_5"),
        ("sail-vl2-tiny", "univl-chat"),
    ],
)
def test_chat_paths_use_the_template_the_config_resolves_to(case, template):
    import json

    from minisail.chat import chat_template
    from minisail.text.templates import template_for_config

    folder = GOLDEN / case / "checkpoint"
    resolved = template_for_config(json.loads((folder / "config.json").read_text()))
    used = chat_template(minisail.load(folder))
    assert used.name == resolved.name == template
    assert used.system_message == resolved.system_message


def test_session_encodes_each_image_once_and_matches_chat(loaded, pixel_values, monkeypatch):
    model, tokenizer = loaded
    calls = []
    original = type(model).encode_images
    monkeypatch.setattr(type(model), "encode_images", lambda self, pv: calls.append(len(pv)) or original(self, pv))
    session = Session((model, tokenizer), max_tiles=12)
    first = session.ask("What is it?", images=[IMAGE], max_new_tokens=6)
    second = session.ask("And the colour?", max_new_tokens=6)
    assert calls == [len(pixel_values)]  # the second turn reuses the first turn's embeddings
    calls.clear()
    response, history = chat(model, tokenizer, pixel_values, "What is it?", dict(max_new_tokens=6), return_history=True)
    again = chat(model, tokenizer, pixel_values, "And the colour?", dict(max_new_tokens=6), history=history)
    assert calls == [len(pixel_values)] * 2  # upstream chat() encodes the image again every turn
    assert (first, second) == (response, again)


def test_right_padded_batches_are_refused(loaded):
    from minisail.generate import generate

    model, _ = loaded
    ids = torch.tensor([[5, 6, 7, 0], [5, 6, 7, 8]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    with pytest.raises(PromptError, match="left-padded"):
        generate(model, ids, mask, None, dict(max_new_tokens=2))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda pv: pv[:, :2], r"must be a float tensor \[tiles, 3, 56, 56\]"),  # 2 channels
        (lambda pv: pv[0], r"not of shape \[3, 56, 56\]"),  # one tile without its tile axis
        (lambda pv: [pv], "not a list"),
        (lambda pv: torch.nn.functional.interpolate(pv, size=64), "64x64 tiles but this model takes 56x56"),
        (lambda pv: torch.full_like(pv, float("nan")), "must be finite floats"),
    ],
)
def test_pixel_values_that_cannot_be_tiles_of_this_model_are_refused_in_words(loaded, pixel_values, make, message):
    model, tokenizer = loaded
    with pytest.raises(PromptError, match=message):
        model.chat(tokenizer, make(pixel_values), "<image>\nhi", dict(max_new_tokens=2))


@pytest.mark.parametrize("history", [[("a",)], [("a", 1)], ["ab"], [{"q": "a"}]])
def test_a_history_that_is_not_question_answer_pairs_is_refused_in_words(loaded, history):
    model, tokenizer = loaded
    with pytest.raises(PromptError, match=r"history\[0\] must be a \(question, answer\) pair of strings"):
        model.chat(tokenizer, None, "hi", dict(max_new_tokens=2), history=history)


@pytest.mark.parametrize("stream", [False, True])
def test_a_reply_cut_at_the_end_of_the_context_is_said_in_the_log(checkpoint, tmp_path, stream):
    folder = shutil.copytree(checkpoint, tmp_path / "short-context")
    config = json.loads((folder / "config.json").read_text())
    config["llm_config"]["max_position_embeddings"] = 64  # the prompt takes ~46 of them
    (folder / "config.json").write_text(json.dumps(config))
    said = []
    session = Session(str(folder), log=said.append)
    for max_new_tokens, cut in ((4, False), (100, True)):  # stopped by max_new_tokens: nothing to say
        said.clear()
        reply = session.ask("Tell me a long story.", stream=stream, max_new_tokens=max_new_tokens)
        if stream:
            "".join(reply)  # the stream runs to its end
        session.reset()
        assert any("cut at the end of the model's context (64 tokens)" in line for line in said) == cut


def test_chat_warns_when_its_reply_is_cut_at_the_end_of_the_context(checkpoint, tmp_path):
    folder = shutil.copytree(checkpoint, tmp_path / "short-context")
    config = json.loads((folder / "config.json").read_text())
    config["llm_config"]["max_position_embeddings"] = 64  # the prompt takes ~46 of them
    (folder / "config.json").write_text(json.dumps(config))
    model, tokenizer = minisail.load(folder), minisail.load_tokenizer(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # stopped by max_new_tokens: no warning
        model.chat(tokenizer, None, "Tell me a long story.", dict(max_new_tokens=4))
    with pytest.warns(MinisailWarning, match=r"cut at the model's context end \(64 tokens") as caught:
        model.chat(tokenizer, None, "Tell me a long story.", dict(max_new_tokens=100))
    assert caught[0].filename == __file__  # pointed at the caller's line, not at minisail's internals
    with pytest.warns(MinisailWarning, match="context end"):
        model.batch_chat(tokenizer, None, ["Tell me a long story.", "And another."], dict(max_new_tokens=100))


def test_the_warning_points_at_a_caller_whose_file_name_starts_like_the_package(checkpoint, tmp_path):
    folder = shutil.copytree(checkpoint, tmp_path / "short-context")
    config = json.loads((folder / "config.json").read_text())
    config["llm_config"]["max_position_embeddings"] = 64
    (folder / "config.json").write_text(json.dumps(config))
    model, tokenizer = minisail.load(folder), minisail.load_tokenizer(folder)
    caller = str(Path(minisail.__file__).parent) + "_eval.py"  # beside the package, not in it (compiled only)
    source = "def ask(model, tokenizer):\n    return model.chat(tokenizer, None, 'Hi', dict(max_new_tokens=100))\n"
    scope: dict = {}
    exec(compile(source, caller, "exec"), scope)
    with pytest.warns(MinisailWarning) as caught:
        scope["ask"](model, tokenizer)
    assert caught[0].filename == caller


class EndCounter:
    def __init__(self):
        self.ended = 0

    def put(self, value):
        pass

    def end(self):
        self.ended += 1


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda m, t, c: m.chat(t, None, "Hi", c, history=[("only a question",)]), PromptError),
        (lambda m, t, c: m.chat(t, None, "Hi", {**c, "num_beams": 2}), ConfigError),
        (lambda m, t, c: m.batch_chat(t, None, "Hi", c), PromptError),
        (lambda m, t, c: m.chat(t, None, "Hi" * 10**5, c), PromptError),  # in generation: ended there, once
    ],
)
def test_a_streamer_is_ended_once_whichever_step_of_chat_fails(loaded, call, error):
    model, tokenizer = loaded
    streamer = EndCounter()
    with pytest.raises(error):
        call(model, tokenizer, {"max_new_tokens": 2, "streamer": streamer})
    assert streamer.ended == 1  # a thread iterating over a TextIteratorStreamer is not left waiting


def test_the_model_cards_streaming_loop_runs(loaded):
    """The InternVL model cards stop reading the streamer at `model.conv_template.sep`."""
    transformers = pytest.importorskip("transformers")
    model, tokenizer = loaded
    streamer = transformers.TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
    config = dict(max_new_tokens=8, do_sample=False, streamer=streamer)
    thread = threading.Thread(target=model.chat, args=(tokenizer, None, "Describe a cat.", config))
    thread.start()
    generated = ""
    for new_text in streamer:
        if new_text == model.conv_template.sep:
            break
        generated += new_text
    thread.join()
    assert model.conv_template.sep == "<|im_end|>\n" and generated.strip()


def test_batch_chat_refuses_one_question_given_as_a_string(loaded):
    model, tokenizer = loaded
    with pytest.raises(PromptError, match="list of questions"):
        model.batch_chat(tokenizer, None, "Hi?", dict(max_new_tokens=2))


def test_chat_streams_through_transformers_text_iterator_streamer_as_the_model_cards_do(loaded):
    transformers = pytest.importorskip("transformers")
    model, tokenizer = loaded
    expected = model.chat(tokenizer, None, "Describe a cat.", dict(max_new_tokens=8, do_sample=False))
    streamer = transformers.TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=60)
    config = dict(max_new_tokens=8, do_sample=False, streamer=streamer)
    thread = threading.Thread(target=model.chat, args=(tokenizer, None, "Describe a cat.", config))
    thread.start()
    pieces = list(streamer)  # ends when chat() ends the streamer
    thread.join()
    assert "".join(pieces).strip().removesuffix("<|im_end|>").strip() == expected


def test_min_new_tokens_from_internvl_evaluation_code_is_honoured(loaded):
    # internvl_chat/eval/vqa/evaluate_vqa.py passes these to model.chat()
    model, tokenizer = loaded
    config = dict(num_beams=1, max_new_tokens=10, min_new_tokens=1, do_sample=False, temperature=0.0)
    assert isinstance(model.chat(tokenizer, None, "Hello", config), str)


# --- upstream's attributes and generate() (minisail/upstream_api.py) ----------------------------------------------


def test_an_assigned_system_message_is_the_one_chat_and_sessions_send(checkpoint):
    model, tokenizer = minisail.load(checkpoint), minisail.load_tokenizer(checkpoint)
    default = model.system_message
    assert default == get_template("internvl2_5").system_message  # the template's (this config sets none)
    model.system_message = "Be brief."  # upstream copies model.system_message into the template at every call
    assert prepare_chat(model, tokenizer, None, "Hi").queries[0].text.startswith("<|im_start|>system\nBe brief.")
    assert model.conv_template.system_message == "Be brief." and model.system_message == "Be brief."
    assert Session(model, tokenizer).template.system_message == "Be brief."
    with pytest.raises(ConfigError, match="system_message must be a string"):
        model.system_message = None


def test_device_dtype_and_a_transformers_tokenizer_refused_in_words(loaded):
    model, tokenizer = loaded
    assert model.device == torch.device("cpu") and model.dtype == next(model.parameters()).dtype
    with pytest.raises(PromptError, match="minisail.load_tokenizer"):
        model.chat(SimpleNamespace(convert_tokens_to_ids=lambda t: 0), None, "Hi", dict(max_new_tokens=2))


def test_generate_with_upstreams_signature_gives_chats_tokens(loaded, pixel_values):
    model, tokenizer = loaded
    prompt = prepare_chat(model, tokenizer, pixel_values, "What is it?")
    options = dict(max_new_tokens=8, do_sample=False, eos_token_id=IM_END)
    ids = model.generate(pixel_values=prompt.pixel_values, input_ids=prompt.input_ids,
                         attention_mask=prompt.attention_mask, **options)  # fmt: skip
    reply = model.chat(tokenizer, pixel_values, "What is it?", dict(max_new_tokens=8, do_sample=False))
    assert decode_reply(tokenizer, ids[0].tolist(), prompt.template) == reply
    features = model.encode_images(prompt.pixel_values)  # upstream's visual_features: the images already encoded
    again = model.generate(input_ids=prompt.input_ids, attention_mask=prompt.attention_mask, visual_features=features,
                           generation_config=options)  # fmt: skip
    assert torch.equal(again, ids)
    with pytest.raises(ConfigError, match="output_hidden_states"):
        model.generate(input_ids=prompt.input_ids, output_hidden_states=True)
    # no eos given: it stops at the language model config's eos, as upstream's language_model.generate does
    from minisail.upstream_api import _language_model_eos

    eos = _language_model_eos(model)
    assert eos is not None
    default = model.generate(input_ids=prompt.input_ids, attention_mask=prompt.attention_mask,
                             visual_features=features, max_new_tokens=8)  # fmt: skip
    given = model.generate(input_ids=prompt.input_ids, attention_mask=prompt.attention_mask,
                           visual_features=features, max_new_tokens=8, eos_token_id=eos)  # fmt: skip
    assert torch.equal(default, given)
    transformers = pytest.importorskip("transformers")  # its GenerationConfig, the type upstream's signature takes
    hf = transformers.GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=IM_END)
    assert torch.equal(model.generate(input_ids=prompt.input_ids, attention_mask=prompt.attention_mask,
                                      visual_features=features, generation_config=hf), ids)  # fmt: skip


def test_generate_without_an_eos_stops_at_the_language_model_configs_eos(checkpoint, tmp_path, pixel_values):
    model, tokenizer = minisail.load(checkpoint), minisail.load_tokenizer(checkpoint)
    prompt = prepare_chat(model, tokenizer, pixel_values, "What is it?")
    first = int(model.generate(pixel_values=prompt.pixel_values, input_ids=prompt.input_ids, max_new_tokens=1)[0, 0])
    folder = shutil.copytree(checkpoint, tmp_path / "eos")
    config = json.loads((folder / "config.json").read_text())
    config["llm_config"]["eos_token_id"] = first  # the language model's eos is the first token it will make
    (folder / "config.json").write_text(json.dumps(config))
    model = minisail.load(folder)
    ids = model.generate(pixel_values=prompt.pixel_values, input_ids=prompt.input_ids, max_new_tokens=8)
    assert ids.tolist() == [[first]]  # upstream's language_model.generate stops there too
