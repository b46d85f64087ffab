"""Conversation templates as data, and the two ways upstream renders a conversation into text.

Mirrors the `Conversation` class and template registry of InternVL `internvl_chat/internvl/conversation.py`
(and its copy in SAIL-VL2's `conversation.py`), Yi's `VL/llava/conversation.py`, and SAIL-VL2's
`chat_template.jinja`. Only the pieces these models use are kept:

- `Template` holds the upstream fields (`system_template`, `system_message`, `roles`, `sep`, `sep_style`,
  `stop_str`, `stop_token_ids`; the last as in the SAIL-VL2 / Mono / older InternVL copies, @ 2410d1d has none
  for these templates). `stop_*` are recorded for completeness; upstream `chat()` does not use them (it stops
  on `sep.strip()`), except Yi-VL, which stops on the text `###`.
- `render(messages)` is upstream `get_prompt()` for the two separator styles in use: `MPT` (every InternVL
  chatml template) and `SINGLE` (Yi-VL's llava `mm_default`).
- `render_sailvl2_chat_template(messages)` renders SAIL-VL2's `chat_template.jinja` (README processor path).

Which system message a model gets: `template_for_config` takes the checkpoint's `config.json` `template`
name and, when present, its `system_message` (upstream `chat()` reads `config.system_message` the same way).
Upstream has two texts under the name `internlm2-chat`, keyed by code version: the InternVL 1.5 release
(InternVL-Chat-V1-5) has the English InternLM message, every later conversation.py (Mono-InternVL-2B,
SAIL-VL2's copy) the Chinese InternVL one. minisail registers the later one as `internlm2-chat` and the
1.5-era one as `internlm2-chat-v1-5`, and picks it for a config that describes InternVL-Chat-V1-5.

SAIL-VL-2B's own template is unknown: its config.json and conversation.py were not readable when this was written.
`internvl2_5` and `Hermes-2` are the two chatml candidates; an unregistered name in a checkpoint config
raises a PromptError that lists the known names, so pass one explicitly rather than guessing silently.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from minisail.errors import PromptError

MPT = "MPT"  # InternVL chatml: system + sep, then role + message + sep per turn, open role last
SINGLE = "SINGLE"  # Yi-VL llava: system + "\n\n### ", then "Role: message\n### " per turn, "Role:" last


@dataclass(frozen=True)
class Template:
    """One conversation template, field for field as upstream `Conversation` declares it."""

    name: str
    system_template: str  # formatted with system_message=...
    system_message: str
    roles: tuple[str, str]  # (user, assistant)
    sep: str
    sep_style: str  # MPT or SINGLE
    stop_str: str | None = None
    stop_token_ids: tuple[int, ...] | None = None
    source: str = ""  # the upstream file this data was read from

    def with_system_message(self, system_message: str) -> Template:
        return replace(self, system_message=system_message)

    def render(self, messages: Sequence[tuple[str, str | None]]) -> str:
        """Upstream `get_prompt()`: `messages` are (role, text) pairs; a falsy text renders the bare role."""
        system_prompt = self.system_template.format(system_message=self.system_message)
        if self.sep_style == MPT:
            # An empty system prompt drops the system block entirely; no template here has one.
            text = system_prompt + self.sep if system_prompt else ""
            for role, message in messages:
                # Upstream tests truthiness, so an empty answer '' also renders as a bare role.
                text += role + message + self.sep if message else role
            return text
        if self.sep_style == SINGLE:
            text = system_prompt + "\n\n" + self.sep + " "
            for role, message in messages:
                text += f"{role}: {message}\n{self.sep} " if message else f"{role}:"
            return text
        raise PromptError(f"template {self.name!r} has unknown separator style {self.sep_style!r}")

    def conversation(self, history: Sequence[tuple[str, str]], question: str) -> list[tuple[str, str | None]]:
        """The messages `chat()` appends: past (question, answer) pairs, the question, an open reply."""
        user, assistant = self.roles
        messages: list[tuple[str, str | None]] = []
        for old_question, old_answer in history:
            messages += [(user, old_question), (assistant, old_answer)]
        return messages + [(user, question), (assistant, None)]


_CHATML_ROLES = ("<|im_start|>user\n", "<|im_start|>assistant\n")
_CHATML_SYSTEM = "<|im_start|>system\n{system_message}"
_INTERNVL_CONV = "InternVL internvl_chat/internvl/conversation.py @ 2410d1d"

INTERNVL_SYSTEM_MESSAGE = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"
)
INTERNLM_SYSTEM_MESSAGE = "You are an AI assistant whose name is InternLM (书生·浦语)."
INTERNVL2_5_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的多模态大语言模型。"
)
UNIVL_SYSTEM_MESSAGE = "你是由抖音内容理解组开发的多模态大模型，英文名叫UniVL, 是一个有用无害的人工智能助手。"
YIVL_SYSTEM_MESSAGE = (
    "This is a chat between an inquisitive human and an AI assistant. "
    "Assume the role of the AI assistant. "
    "Read all the images carefully, and respond to the human's questions with informative, helpful, "
    "detailed and polite answers. "
    "这是一个好奇的人类和一个人工智能助手之间的对话。"
    "假设你扮演这个AI助手的角色。仔细阅读所有的图像，并对人类的问题做出信息丰富、有帮助、详细的和礼貌的回答。"
)

_INTERNLM2_CHAT = Template(
    name="internlm2-chat",
    system_template=_CHATML_SYSTEM,
    system_message=INTERNVL_SYSTEM_MESSAGE,
    roles=_CHATML_ROLES,
    sep="<|im_end|>",
    sep_style=MPT,
    stop_token_ids=(2, 92543, 92542),
    source=_INTERNVL_CONV + " (also Mono-InternVL-2B, SAIL-VL2-2B conversation.py)",
)

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        _INTERNLM2_CHAT,
        # Same name upstream; the InternVL 1.5 release's conversation.py (InternVL @ a08ba33) that
        # InternVL-Chat-V1-5 ships carries the English InternLM message (inferred from the files' sizes).
        replace(
            _INTERNLM2_CHAT,
            name="internlm2-chat-v1-5",
            system_message=INTERNLM_SYSTEM_MESSAGE,
            source="InternVL internvl_chat/internvl/conversation.py @ a08ba33, template internlm2-chat",
        ),
        Template(
            name="Hermes-2",
            system_template=_CHATML_SYSTEM,
            system_message=INTERNVL_SYSTEM_MESSAGE,
            roles=_CHATML_ROLES,
            sep="<|im_end|>",
            sep_style=MPT,
            stop_str="<|endoftext|>",
            stop_token_ids=(2, 6, 7, 8),
            source=_INTERNVL_CONV,
        ),
        Template(
            name="internvl2_5",
            system_template=_CHATML_SYSTEM,
            system_message=INTERNVL2_5_SYSTEM_MESSAGE,
            roles=_CHATML_ROLES,
            sep="<|im_end|>\n",  # the only template here with a newline after every <|im_end|>
            sep_style=MPT,
            source=_INTERNVL_CONV,
        ),
        Template(
            name="univl-chat",
            system_template=_CHATML_SYSTEM,
            system_message=UNIVL_SYSTEM_MESSAGE,
            roles=_CHATML_ROLES,
            sep="<|im_end|>",
            sep_style=MPT,
            stop_token_ids=(2, 92543, 92542),  # InternLM2 ids left over upstream; unused
            source="SAIL-VL2-2B conversation.py (HF BytedanceDouyinContent/SAIL-VL2-2B)",
        ),
        Template(
            name="mm_default",
            system_template="{system_message}",  # llava's Conversation has a plain `system` string
            system_message=YIVL_SYSTEM_MESSAGE,
            roles=("Human", "Assistant"),
            sep="###",
            sep_style=SINGLE,
            stop_str="###",  # the scripts' KeywordsStoppingCriteria
            source="Yi VL/llava/conversation.py @ f73194c, mm_default_conv",
        ),
    )
}


def get_template(name: str) -> Template:
    """The registered template `name` (upstream spelling, e.g. 'Hermes-2'); PromptError if unknown."""
    try:
        return TEMPLATES[name]
    except KeyError:
        known = ", ".join(sorted(TEMPLATES))
        raise PromptError(
            f"unknown conversation template {name!r}; known templates: {known}. "
            "Pass one of these explicitly (for SAIL-VL-2B the template is not known yet: try "
            "'internvl2_5' or 'Hermes-2' and compare with the official code)"
        ) from None


def _is_internvl_chat_v1_5(config: Mapping) -> bool:
    # The V1-5 layout: InternViT-6B (the only ViT here with qk-normalization) in front of a plain InternLM2;
    # Mono-InternVL's LLM is InternLM2VEForCausalLM. InternVL2-26B has the same layout but the later, Chinese
    # conversation.py; it is not a minisail target (its config can set system_message, or pass the template).
    vision = config.get("vision_config") or {}
    llm = config.get("llm_config") or {}
    return bool(vision.get("qk_normalization")) and list(llm.get("architectures") or []) == ["InternLM2ForCausalLM"]


def template_for_config(config: Mapping) -> Template:
    """The template a checkpoint's `config.json` asks for, with its `system_message` when it sets one."""
    name = config.get("template")
    if name is None:
        if config.get("model_type") == "llava":  # Yi-VL: llava configs carry no template key
            name = "mm_default"
        else:
            raise PromptError(
                "config.json has no 'template' key, so the conversation template is unknown; "
                f"pass one explicitly (known: {', '.join(sorted(TEMPLATES))})"
            )
    if name == "internlm2-chat" and _is_internvl_chat_v1_5(config):
        name = "internlm2-chat-v1-5"
    template = get_template(name)
    system_message = config.get("system_message")
    return template if system_message is None else template.with_system_message(system_message)


def render_sailvl2_chat_template(messages: Sequence[Mapping], *, add_generation_prompt: bool = True) -> str:
    """SAIL-VL2's `chat_template.jinja`, as `processor.apply_chat_template` renders it.

    `messages` are `{"role": ..., "content": str | [{"type": "image"|"text", ...}, ...]}`. Faithful quirks:
    a system message renders the literal `<|im_system|>` and replaces the default system block, an
    assistant turn renders the literal `<|im_assistant|>` (neither is a token in the vocabulary), and
    each image item becomes `<image>\\n`.
    """
    parts = []
    for index, message in enumerate(messages):
        role, content = message["role"], message["content"]
        if index == 0 and role != "system":
            parts.append(f"<|im_start|>system\n{UNIVL_SYSTEM_MESSAGE}<|im_end|>")
        parts.append(
            {"system": "<|im_system|>", "user": "<|im_start|>user\n", "assistant": "<|im_assistant|>"}.get(role, "")
        )
        if isinstance(content, str):
            parts.append(content)
        else:
            for item in content:
                is_image = item.get("type") == "image" or "image" in item or "image_url" in item
                parts.append("<image>\n" if is_image else item["text"])
        parts.append("<|im_end|>")
    if add_generation_prompt:
        parts.append("<|im_start|>assistant\n")
    return "".join(parts)
