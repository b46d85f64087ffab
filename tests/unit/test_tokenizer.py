"""Tokenizers: the golden cases of the slow transformers tokenizers, SentencePiece reading, and bad input.

tests/data/tokenizer_cases.json is shared/golden/tokenizer/cases.json: 65 strings per tokenizer, run through the
slow classes of transformers 4.44.2 (Qwen2Tokenizer for Qwen2.5 / Qwen3, InternVL's InternLM2Tokenizer).
The folders come from tests/helpers/tokenizer_files.py: "shipped" is the checkpoint folder as published, "relisted"
the same with the image tokens' additional_special_tokens listing flipped (it changes only what
skip_special_tokens drops), "slow-files" the Qwen folders without tokenizer.json (vocab.json + merges.txt).
"""

from __future__ import annotations

import json
import lzma
import random
import shutil
import unicodedata

import pytest
import torch
from helpers import tokenizer_files
from helpers.sentencepiece_proto import TOY_CHARS, TOY_MERGES, toy_model
from hypothesis import given, settings
from hypothesis import strategies as st

import minisail
from minisail.errors import TokenizerError
from minisail.text import sentencepiece as spm_backend
from minisail.text import sentencepiece_model as spm_model
from minisail.text.tokenizer import clean_up_tokenization, load_tokenizer

GOLDEN = json.loads(tokenizer_files.CASES.read_text(encoding="utf-8"))
CASES = GOLDEN["cases"]
FOLDERS = {"qwen2.5": tokenizer_files.qwen25_tokenizer_dir, "qwen3": tokenizer_files.sailvl2_tokenizer_dir}
FOLDERS["internlm2"] = lambda factory, tokenizer_json=True: tokenizer_files.internlm2_tokenizer_dir(factory)
LISTED, UNLISTED = "decode_skip_special_tokens", "decode_skip_special_tokens_unlisted_image_tokens"
SHIPPED_SKIP_FIELD = {"qwen2.5": LISTED, "qwen3": UNLISTED, "internlm2": LISTED}  # what each real folder says


def case_id(case: dict) -> str:
    return f"{case['tokenizer']}-{CASES.index(case)}-{case['category']}"


@pytest.fixture(scope="session")
def tokenizer_for(tmp_path_factory, qwen25_tokenizer, sailvl2_tokenizer, internlm2_tokenizer):
    """tokenizer_for(name, form) with form "shipped", "relisted" or "slow-files"; each loaded once."""
    cache = {("qwen2.5", "shipped"): qwen25_tokenizer, ("qwen3", "shipped"): sailvl2_tokenizer}
    cache[("internlm2", "shipped")] = internlm2_tokenizer

    def get(name: str, form: str):
        if (name, form) not in cache:
            folder = FOLDERS[name](tmp_path_factory, tokenizer_json=form != "slow-files")
            if form == "relisted":
                target = tmp_path_factory.mktemp(f"{name}-relisted") / "tokenizer"
                listed = SHIPPED_SKIP_FIELD[name] == UNLISTED
                folder = tokenizer_files.relisted_copy(folder, target, image_tokens_listed=listed)
            cache[(name, form)] = load_tokenizer(folder)
        return cache[(name, form)]

    return get


# --- golden cases ---------------------------------------------------------------------------------------


def check_ids_and_decodes(tokenizer, case: dict, skip_field: str) -> None:
    text = case["text"]
    assert tokenizer.encode(text) == case["ids"]
    assert tokenizer.encode(text, add_special_tokens=False) == case["ids_add_special_tokens_false"]
    split = tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert split == case["ids_split_special_tokens"]
    assert tokenizer.convert_ids_to_tokens(case["ids"]) == case["tokens"]
    assert tokenizer.decode(case["ids"]) == case["decode"]
    assert tokenizer.decode(case["ids_add_special_tokens_false"]) == case["decode_add_special_tokens_false_ids"]
    assert tokenizer.decode(case["ids"], skip_special_tokens=True) == case[skip_field]
    assert (tokenizer.decode(case["ids_add_special_tokens_false"]) == text) is case["roundtrip_exact"]


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_golden_case_shipped_folder(case, tokenizer_for):
    tokenizer = tokenizer_for(case["tokenizer"], "shipped")
    check_ids_and_decodes(tokenizer, case, SHIPPED_SKIP_FIELD[case["tokenizer"]])


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_golden_case_image_tokens_relisted(case, tokenizer_for):
    tokenizer = tokenizer_for(case["tokenizer"], "relisted")
    other = UNLISTED if SHIPPED_SKIP_FIELD[case["tokenizer"]] == LISTED else LISTED
    check_ids_and_decodes(tokenizer, case, other)


@pytest.mark.parametrize("case", [c for c in CASES if c["tokenizer"] != "internlm2"], ids=case_id)
def test_golden_case_from_vocab_and_merges(case, tokenizer_for):
    """Checkpoints ship vocab.json + merges.txt too; without tokenizer.json they must give the same answers."""
    check_ids_and_decodes(tokenizer_for(case["tokenizer"], "slow-files"), case, SHIPPED_SKIP_FIELD[case["tokenizer"]])


@pytest.mark.parametrize("name", ["qwen2.5", "qwen3", "internlm2"])
@pytest.mark.parametrize("form", ["shipped", "slow-files"])
def test_vocabulary_and_special_tokens(name, form, tokenizer_for):
    if name == "internlm2" and form == "slow-files":
        pytest.skip("InternLM2 ships only tokenizer.model")
    want = GOLDEN["tokenizers"][name]
    tokenizer = tokenizer_for(name, form)
    assert (len(tokenizer), tokenizer.vocab_size) == (want["len_tokenizer"], want["base_vocab_size"])
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (want["bos_token_id"], want["eos_token_id"])
    assert tokenizer.pad_token_id == want["pad_token_id"]
    flags = {str(i): token.special for i, token in tokenizer.added_tokens.items()}
    assert flags == want["added_token_special_flag"]
    listed_images = SHIPPED_SKIP_FIELD[name] == LISTED
    image_tokens = tokenizer_files.IMAGE_TOKENS
    expected_special = [t for t in want["all_special_tokens"] if listed_images or t not in image_tokens]
    assert tokenizer.special_tokens == expected_special
    assert tokenizer.add_bos_token is (want["add_bos_token"] is True)
    context = {"qwen2.5": 151667, "qwen3": 151671, "internlm2": 92546}[name]  # the releases' tokenizer files
    assert tokenizer.token_to_id("<IMG_CONTEXT>") == context and tokenizer.id_to_token(context) == "<IMG_CONTEXT>"


def test_legacy_files_without_added_tokens_decoder(tmp_path, tmp_path_factory):
    """Older checkpoints: added tokens from added_tokens.json (special if listed in special_tokens_map.json)."""
    source = tokenizer_files.qwen25_tokenizer_dir(tmp_path_factory, tokenizer_json=False)
    folder = shutil.copytree(source, tmp_path / "legacy")
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    for key in ["added_tokens_decoder", "additional_special_tokens", "eos_token", "pad_token"]:
        del config[key]
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    tokenizer = load_tokenizer(folder)
    want = GOLDEN["tokenizers"]["qwen2.5"]
    assert {str(i): token.special for i, token in tokenizer.added_tokens.items()} == want["added_token_special_flag"]
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, len(tokenizer)) == (151645, 151643, 151674)
    for case in [c for c in CASES if c["tokenizer"] == "qwen2.5"]:
        check_ids_and_decodes(tokenizer, case, LISTED)


def test_tensor_ids_and_the_shared_data_sample(sailvl2_tokenizer):
    ids = sailvl2_tokenizer.encode("<|im_start|>user\nHello, 世界! 12345<|im_end|>\n")
    assert ids == [151644, 872, 198, 9707, 11, 220, 99489, 0, 220, 16, 17, 18, 19, 20, 151645, 198]  # SOURCES.md
    assert sailvl2_tokenizer.decode(torch.tensor(ids), skip_special_tokens=True) == "user\nHello, 世界! 12345\n"
    assert sailvl2_tokenizer.decode(list(torch.tensor(ids[:3]))) == "<|im_start|>user\n"


def test_internlm2_decode_cleans_up_spaces_before_punctuation(internlm2_tokenizer):
    """InternLM2Tokenizer.convert_tokens_to_string always runs clean_up_tokenization (the golden strings have
    no such text, so this pins the rule read from tokenization_internlm2.py)."""
    text = "Hello , world . Is n't it ?"
    assert internlm2_tokenizer.decode(internlm2_tokenizer.encode(text)) == " <s>Hello, world. Isn't it?"
    assert clean_up_tokenization(text) == "Hello, world. Isn't it?"


TEXT = st.text(
    st.sampled_from(list("ab xyz.,!?'\n\t\r<>|/_-0123") + list("é\u0301你好世界こんにちは🐼👨\u200d👩")), max_size=40
)


@settings(max_examples=150, deadline=None)
@given(text=TEXT)
def test_plain_text_round_trips(text, sailvl2_tokenizer, internlm2_tokenizer):
    """Text with no added token in it: splitting changes nothing, and decoding gives it back (Qwen after NFC,
    InternLM2 after its clean-up)."""
    qwen_ids = sailvl2_tokenizer.encode(text)
    assert qwen_ids == sailvl2_tokenizer.encode(text, split_special_tokens=True)
    assert sailvl2_tokenizer.decode(qwen_ids) == unicodedata.normalize("NFC", text)
    ids = internlm2_tokenizer.encode(text, add_special_tokens=False)
    assert ids == internlm2_tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)
    assert internlm2_tokenizer.decode(ids) == clean_up_tokenization(text)


def test_internlm2_matches_sentencepiece_on_random_text(internlm2_tokenizer_dir, internlm2_tokenizer):
    """split_special_tokens=True is plain `sp_model.encode` (the golden README says so for InternLM2)."""
    sentencepiece = pytest.importorskip("sentencepiece")
    processor = sentencepiece.SentencePieceProcessor(model_file=str(internlm2_tokenizer_dir / "tokenizer.model"))
    rng = random.Random(0)
    blocks = [(0x20, 0x7E), (0xA0, 0x24F), (0x400, 0x4FF), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3)]
    blocks += [(0x1F300, 0x1F6FF), (0x0, 0x1F)]
    for _ in range(500):
        text = "".join(chr(rng.randint(*rng.choice(blocks))) for _ in range(rng.randint(0, 30)))
        ids = processor.encode(text)
        assert internlm2_tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True) == ids, text
        assert internlm2_tokenizer.decode(ids) == clean_up_tokenization(processor.decode(ids)), text


# --- SentencePiece models built here ----------------------------------------------------------------------


def toy_backend(**options):
    return spm_backend.build_backend(spm_model.parse_model_proto(toy_model(**options)))


def test_toy_model_fields():
    model = spm_model.parse_model_proto(toy_model())
    assert len(model.pieces) == 4 + 256 + len(TOY_MERGES) + len(TOY_CHARS)
    assert (model.model_type, model.byte_fallback) == (spm_model.BPE, True)
    assert (model.unk_id, model.bos_id, model.eos_id, model.pad_id) == (0, 1, 2, -1)
    assert (model.add_dummy_prefix, model.remove_extra_whitespaces, model.escape_whitespaces) == (True, False, True)
    assert model.pieces[3] == spm_model.Piece("<|im_sep|>", 0.0, spm_model.USER_DEFINED)
    assert model.pieces[260] == spm_model.Piece("ll", 0.0, spm_model.NORMAL)


def test_toy_model_dummy_prefix_byte_fallback_and_whitespace():
    backend = toy_backend()
    tokens = lambda text: backend.encode(text, add_special_tokens=False).tokens  # noqa: E731
    assert tokens("hello world") == ["▁hello", "▁world"]  # dummy prefix, merged by score
    assert tokens("hello  world") == ["▁hello", "▁", "▁world"]  # every space is a "▁"
    assert tokens("hé") == ["▁h", "<0xC3>", "<0xA9>"]  # é is not a piece: its UTF-8 bytes
    assert tokens("") == [] and tokens(" ") == ["▁▁"]
    assert tokens("hello<|im_sep|>world") == ["▁hello", "<|im_sep|>", "w", "or", "ld"]  # atomic, no new prefix
    assert tokens("<s>") == ["▁", "<0x3C>", "<0x73>", "<0x3E>"]  # control pieces are never matched in text
    for text in ["hello world", " hello", "hé  中", "hello<|im_sep|>world"]:
        ids = backend.encode(text, add_special_tokens=False).ids
        assert backend.decode(ids, skip_special_tokens=True) == text
    assert backend.decode([1, *backend.encode("hello").ids, 2], skip_special_tokens=True) == "hello"


def test_toy_model_options():
    no_prefix = toy_backend(add_dummy_prefix=False)
    assert no_prefix.encode("hello world").tokens == ["h", "e", "llo", "▁world"]
    collapse = toy_backend(remove_extra_whitespaces=True)
    assert collapse.encode("  hello   world  ").tokens == ["▁hello", "▁world"]
    assert collapse.encode("   ").tokens == []
    with pytest.raises(TokenizerError, match="UNIGRAM"):
        toy_backend(model_type=1)


def test_toy_model_matches_sentencepiece():
    sentencepiece = pytest.importorskip("sentencepiece")
    rng = random.Random(1)
    alphabet = list("helowrd中é x\n") + ["<|im_sep|>", "<s>", "  "]
    for options in [{}, {"remove_extra_whitespaces": True}, {"add_dummy_prefix": False}]:
        processor = sentencepiece.SentencePieceProcessor(model_proto=toy_model(**options))
        backend = toy_backend(**options)
        for _ in range(300):
            text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 10)))
            if text.strip(" ") == "<|im_sep|>":
                continue  # the one documented difference: a text that is exactly one user-defined symbol
            ids = processor.encode(text)
            assert backend.encode(text, add_special_tokens=False).ids == ids, (options, text)
            assert backend.decode(ids, skip_special_tokens=True) == processor.decode(ids), (options, text)


def test_piece_decoder_keeps_valid_characters_of_a_broken_byte_run(internlm2_tokenizer):
    panda = internlm2_tokenizer.encode("🐼", add_special_tokens=False)
    assert panda == [243, 162, 147, 191]  # four byte pieces
    assert internlm2_tokenizer.decode(panda + panda[:1]) == "🐼\ufffd"  # a reply cut after a lead byte
    assert internlm2_tokenizer.decode(panda[:3]) == "\ufffd" * 3  # one U+FFFD per byte, as SentencePiece
    assert internlm2_tokenizer.decode([9843, *panda[1:]]) == "Hello" + "\ufffd" * 3


def test_piece_decoder_matches_sentencepiece_on_random_ids():
    sentencepiece = pytest.importorskip("sentencepiece")
    rng = random.Random(2)
    for options in [{}, {"remove_extra_whitespaces": True}, {"add_dummy_prefix": False}]:
        data = toy_model(**options)
        processor = sentencepiece.SentencePieceProcessor(model_proto=data)
        decode = spm_backend.PieceDecoder(spm_model.parse_model_proto(data))
        for _ in range(1000):
            ids = [rng.randrange(processor.get_piece_size()) for _ in range(rng.randint(0, 8))]
            ids += [rng.choice([0x4 + 0xF0, 0x4 + 0x9F, 0x4 + 0x90, 0x4 + 0xBC, 4 + 0x41])] * rng.randint(0, 2)
            assert decode(ids) == processor.decode(ids), (options, ids)


def test_yi_like_folder_through_load_tokenizer(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(toy_model())
    config = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False, "bos_token": "<s>", "eos_token": "</s>"}
    config |= {"unk_token": "<unk>", "pad_token": "<unk>"}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = minisail.load_tokenizer(tmp_path)  # the public entry point
    assert (len(tokenizer), tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (280, 1, 2, 0)
    assert tokenizer.encode("hello") == [264]  # "▁hello", no BOS
    assert tokenizer.encode("\nhello") == [271, 14, 272, 273, 263]  # "▁", <0x0A>, "h", "e", "llo"
    ids = tokenizer.encode("hello</s> world")  # </s> is cut out as an added token; each side gets its "▁"
    assert ids == [264, 2, 271, 269]
    assert tokenizer.decode(ids) == " hello</s> world"  # legacy LlamaTokenizer: a space opens the special run
    assert tokenizer.decode(ids, skip_special_tokens=True) == "hello  world"
    del config["add_bos_token"]  # LlamaTokenizer adds BOS by default
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(tmp_path).encode("hello") == [1, 264]


# --- bad input --------------------------------------------------------------------------------------------


def test_missing_folder_and_missing_files(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(TokenizerError, match="is not a folder"):
        load_tokenizer(tmp_path / "file.txt")
    with pytest.raises(TokenizerError, match="no tokenizer files"):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_json_and_config(tmp_path, sailvl2_tokenizer_dir):
    data = (sailvl2_tokenizer_dir / "tokenizer.json").read_bytes()
    (tmp_path / "tokenizer.json").write_bytes(data[: len(data) // 2])
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json.*download it again"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    (tmp_path / "tokenizer.model").write_bytes(toy_model())
    (tmp_path / "tokenizer_config.json").write_text('{"add_bos_token": tru')
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("[1, 2]")
    with pytest.raises(TokenizerError, match="tokenizer_config.json is not a JSON object"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("model", ["internlm2", "toy"])
def test_truncated_tokenizer_model(tmp_path, model):
    if model == "internlm2":  # cut inside the pieces
        data = lzma.decompress((tokenizer_files.DATA / "internvl-internlm2" / "tokenizer.model.xz").read_bytes())
        data = data[: len(data) // 4]
    else:  # cut inside the normalizer spec at the very end
        data = toy_model()[:-3]
    (tmp_path / "tokenizer.model").write_bytes(data)
    with pytest.raises(TokenizerError, match="not a valid SentencePiece model.*truncated"):
        load_tokenizer(tmp_path)


def test_garbage_tokenizer_model(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b'{"this": "is json"}')
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        load_tokenizer(tmp_path)


def test_bad_encode_and_decode_arguments(internlm2_tokenizer):
    with pytest.raises(TokenizerError, match="takes a str"):
        internlm2_tokenizer.encode(b"bytes")
    with pytest.raises(TokenizerError, match="not in this tokenizer"):
        internlm2_tokenizer.decode([1, 92553])
    with pytest.raises(TokenizerError, match="sequence of ints"):
        internlm2_tokenizer.decode([1.5])
    assert internlm2_tokenizer.id_to_token(-1) is None and internlm2_tokenizer.token_to_id("<nope>") is None


@pytest.mark.parametrize("text", ["caf\udce9", "a\ud800b"])  # a byte that was not UTF-8 (surrogateescape), a lone half
def test_text_that_is_not_valid_unicode_is_refused_as_the_texts_fault(text, sailvl2_tokenizer, internlm2_tokenizer):
    from minisail.errors import PromptError

    for tokenizer in (sailvl2_tokenizer, internlm2_tokenizer):
        with pytest.raises(PromptError, match="not valid Unicode at character"):  # not "the file is probably corrupt"
            tokenizer.encode(text)
