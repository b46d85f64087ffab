"""Conversation templates: data against the golden prompt cases, rendering rules, name resolution."""

import json

import pytest
from helpers import paths

from minisail.errors import PromptError
from minisail.text.templates import (
    MPT,
    SINGLE,
    TEMPLATES,
    get_template,
    render_sailvl2_chat_template,
    template_for_config,
)

CASES = json.loads((paths.DATA / "prompt_cases.json").read_text(encoding="utf-8"))

# golden variant -> the minisail template that reproduces it
VARIANT_TEMPLATES = {
    "internvl-chat-v1-5": "internlm2-chat-v1-5",
    "mono-internvl-2b": "internlm2-chat",
    "internvl2_5": "internvl2_5",
    "hermes-2": "Hermes-2",
    "sail-vl2-2b": "univl-chat",
    "mono-internvl-github": "internlm2-chat",
}


@pytest.mark.parametrize("variant", sorted(VARIANT_TEMPLATES))
def test_chatml_template_fields_match_upstream(variant):
    golden = CASES["templates"][variant]["template"]
    template = get_template(VARIANT_TEMPLATES[variant])
    assert template.system_template == golden["system_template"]
    assert template.system_message == golden["system_message"]
    assert template.system_message == golden.get("system_message_used_by_chat", golden["system_message"])
    assert list(template.roles) == golden["roles"]
    assert template.sep == golden["sep"]
    assert template.sep_style == golden["sep_style"] == MPT
    assert template.stop_str == golden["stop_str"]
    # The upstream name is what config.json says; the v1-5 variant is minisail's name for the 1.5-era text.
    assert golden["name"] in TEMPLATES


def test_yivl_template_fields_match_upstream():
    golden = CASES["templates"]["yi-vl"]["template"]
    template = get_template("mm_default")
    assert template.system_message == golden["system"]
    assert list(template.roles) == golden["roles"]
    assert (template.sep, template.sep_style, template.stop_str) == (golden["sep"], SINGLE, "###")


def test_mpt_rendering_separators():
    hermes, internvl2_5 = get_template("Hermes-2"), get_template("internvl2_5")
    text = hermes.render(hermes.conversation([("q1", "a1")], "q2"))
    assert text.endswith(
        "<|im_end|><|im_start|>user\nq1<|im_end|><|im_start|>assistant\na1<|im_end|>"
        "<|im_start|>user\nq2<|im_end|><|im_start|>assistant\n"
    )
    assert "<|im_end|>\n" not in text
    text = internvl2_5.render(internvl2_5.conversation([], "q"))
    assert text.count("<|im_end|>\n") == 2 and text.endswith("<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n")


def test_mpt_empty_answer_renders_bare_role_like_upstream():
    template = get_template("internlm2-chat")
    text = template.render(template.conversation([("q1", "")], "q2"))
    assert "<|im_start|>assistant\n<|im_start|>user\nq2" in text


def test_mpt_empty_system_prompt_drops_system_block():
    template = get_template("Hermes-2")
    bare = type(template)(**{**template.__dict__, "system_template": "{system_message}", "system_message": ""})
    assert bare.render(bare.conversation([], "q")) == "<|im_start|>user\nq<|im_end|><|im_start|>assistant\n"


def test_single_style_rendering_yivl():
    template = get_template("mm_default")
    text = template.render(template.conversation([("q1", "a1")], "q2"))
    assert text == template.system_message + "\n\n### Human: q1\n### Assistant: a1\n### Human: q2\n### Assistant:"


def test_with_system_message_is_a_copy():
    template = get_template("internvl2_5")
    other = template.with_system_message("Be brief.")
    assert other.render(other.conversation([], "q")).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")
    assert get_template("internvl2_5").system_message == template.system_message != "Be brief."


def test_unknown_template_lists_known_ones():
    with pytest.raises(PromptError) as error:
        get_template("sailvl-chat")
    for name in ("internvl2_5", "Hermes-2", "internlm2-chat", "univl-chat", "mm_default"):
        assert name in str(error.value)


def test_template_for_config_system_message_and_variants():
    assert template_for_config({"template": "Hermes-2"}) is get_template("Hermes-2")
    custom = template_for_config({"template": "Hermes-2", "system_message": "Hi."})
    assert custom.system_message == "Hi." and custom.sep == "<|im_end|>"
    v15 = {
        "template": "internlm2-chat",
        "vision_config": {"hidden_size": 3200, "qk_normalization": True},
        "llm_config": {"architectures": ["InternLM2ForCausalLM"]},
    }
    assert template_for_config(v15).name == "internlm2-chat-v1-5"
    mono_message = CASES["templates"]["mono-internvl-2b"]["template"]["system_message"]
    mono = {**v15, "vision_config": {"hidden_size": 1024}, "llm_config": {"architectures": ["InternLM2VEForCausalLM"]}}
    assert template_for_config(mono).system_message == mono_message
    assert template_for_config({**v15, "llm_config": mono["llm_config"]}).name == "internlm2-chat"
    assert template_for_config({**v15, "system_message": "Hi."}).system_message == "Hi."
    assert template_for_config({"model_type": "llava"}).name == "mm_default"
    with pytest.raises(PromptError, match="no 'template' key"):
        template_for_config({"model_type": "sailvl"})
    with pytest.raises(PromptError, match="unknown conversation template 'sailvl-chat'"):
        template_for_config({"template": "sailvl-chat"})


PROCESSOR_CASES = [case for case in CASES["cases"] if case["entry"] == "processor"]


@pytest.mark.parametrize("case", PROCESSOR_CASES, ids=[case["id"] for case in PROCESSOR_CASES])
def test_sailvl2_chat_template_matches_golden(case):
    call = case["calls"][0]
    assert render_sailvl2_chat_template(call["inputs"]["messages"]) == call["chat_template_text"]


SAILVL2_EXTRA_MESSAGES = [
    [{"role": "user", "content": "Hi"}],
    [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "a"}],
        }
    ],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "tool", "content": "c"},
    ],
    [{"role": "system", "content": [{"type": "text", "text": "sys"}]}, {"role": "user", "content": "q"}],
]


@pytest.mark.parametrize("messages", SAILVL2_EXTRA_MESSAGES)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_sailvl2_chat_template_agrees_with_jinja(messages, add_generation_prompt):
    jinja2 = pytest.importorskip("jinja2")  # a test-only cross-check; minisail does not use jinja
    source = CASES["templates"]["sail-vl2-2b"]["chat_template_jinja"]
    expected = (
        jinja2.Environment().from_string(source).render(messages=messages, add_generation_prompt=add_generation_prompt)
    )
    assert render_sailvl2_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


GOLDEN_CONFIGS = sorted((paths.GOLDEN).glob("*/checkpoint/config.json"))
EXPECTED_BY_PREFIX = {
    "internvl-internlm2": "internlm2-chat-v1-5",  # the V1-5 layout
    "internvl-qwen2": "internvl2_5",
    "mono-internvl": "internlm2-chat",
    "sail-vl2": "univl-chat",
    "yi-vl": "mm_default",
}


@pytest.mark.parametrize("path", GOLDEN_CONFIGS, ids=[p.parent.parent.name for p in GOLDEN_CONFIGS])
def test_golden_checkpoint_configs_resolve(path):
    case = path.parent.parent.name
    expected = next(name for prefix, name in EXPECTED_BY_PREFIX.items() if case.startswith(prefix))
    assert template_for_config(json.loads(path.read_text(encoding="utf-8"))).name == expected
