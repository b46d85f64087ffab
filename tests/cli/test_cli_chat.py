"""`python -m minisail chat` end to end (in process): streamed replies, interactive turns, --think, clear errors."""

from __future__ import annotations

import io
import json
import shutil
import sys
from types import SimpleNamespace

import pytest
from helpers.chat_checkpoint import IMAGE, build_chat_checkpoint

import minisail
from minisail.chat import chat
from minisail.cli import main
from minisail.cli.chat import _chat_turn
from minisail.fast import matvec
from minisail.fast.matvec import MatVecLinear
from minisail.image.preprocess import internvl_pixel_values
from minisail.session import Session


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_chat_checkpoint(tmp_path_factory.mktemp("cli-chat") / "ckpt")


@pytest.fixture(scope="module")
def loaded(checkpoint):
    return minisail.load(checkpoint), minisail.load_tokenizer(checkpoint)


@pytest.fixture(scope="module")
def reference(loaded):
    """Replies through the chat() API (its own tests check them against the raw greedy ids)."""
    pixel_values = internvl_pixel_values(IMAGE, max_tiles=12, image_size=56)
    return lambda question, **kw: chat(*loaded, pixel_values, question, dict(max_new_tokens=8), **kw)


def run(capsys, *argv, stdin=None, monkeypatch=None):
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = main(["chat", *map(str, argv)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def test_one_question_streams_the_greedy_reply(checkpoint, reference, capsys):
    question = "What animal is in the picture?"
    code, out, err = run(capsys, "--model", checkpoint, "--image", IMAGE, "--max-new-tokens", 8, question)
    assert code == 0
    assert out == reference(question) + "\n"
    assert "loading the checkpoint" in err and "loaded internvl" in err  # progress goes to stderr


def test_interactive_chat_keeps_history_and_resets(checkpoint, reference, capsys, monkeypatch):
    q1, q2 = "What animal is in the picture?", "Where does it live?"
    stdin = f"{q1}\n{q2}\n/reset\n{q1}\n/exit\nnever asked\n"
    code, out, err = run(capsys, "--model", checkpoint, "--image", IMAGE, "--max-new-tokens", 8, stdin=stdin,
                         monkeypatch=monkeypatch)  # fmt: skip
    assert code == 0
    first, history = reference(q1, return_history=True)
    second = reference(q2, history=history)  # turn 2 sees turn 1 and the same image
    assert out == f"{first}\n{second}\n{first}\n"  # after /reset the image goes with the first question again
    assert "history cleared" in err


def test_sampling_flags_reach_the_sampler(checkpoint, loaded, capsys):
    flags = ["--temperature", 1.2, "--top-p", 0.9, "--top-k", 100, "--repetition-penalty", 1.1, "--seed", 3]
    code, out, _ = run(capsys, "--model", checkpoint, "--max-new-tokens", 6, *flags, "Tell me a story.")
    sampling = dict(temperature=1.2, top_p=0.9, top_k=100, repetition_penalty=1.1, seed=3, max_new_tokens=6)
    assert code == 0
    assert out == Session(*loaded).ask("Tell me a story.", **sampling) + "\n"
    assert out != Session(*loaded).ask("Tell me a story.", max_new_tokens=6) + "\n"  # not greedy


def test_errors_exit_2_with_a_clear_message(checkpoint, tmp_path, capsys):
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(checkpoint / name, no_tokenizer / name)
    code, _, err = run(capsys, "--model", no_tokenizer, "Hi")
    assert code == 2 and "no tokenizer files" in err

    broken = tmp_path / "broken.jpg"
    broken.write_text("not a jpeg")
    code, _, err = run(capsys, "--model", checkpoint, "--image", broken, "Hi")
    assert code == 2 and "not an image file" in err and "loading" not in err  # fails before loading

    code, _, err = run(capsys, "--model", checkpoint, "word " * 5000)
    assert code == 2 and "context holds 4096" in err


class FakeSession:
    """Replays (kind, text) events, to check how --think prints them."""

    def __init__(self, events, reply):
        self.events, self.history = events, [("q", reply)]

    def ask(self, question, images, *, stream, think, **sampling):
        return iter(self.events)


def test_think_output_shows_reasoning_then_answer(capsys):
    events = [("reasoning", "1 + 1 = 2."), ("answer", "The sum is \\boxed{2}.")]
    session = FakeSession(events, "<think>1 + 1 = 2.</think> The sum is \\boxed{2}.")
    args = SimpleNamespace(think=True, temperature=None, top_p=None, top_k=None, repetition_penalty=None,
                           max_new_tokens=8, seed=None)  # fmt: skip
    _chat_turn(session, "What is 1+1?", [], args)
    out = capsys.readouterr().out
    assert out == "[thinking]\n1 + 1 = 2.\n[answer]\nThe sum is \\boxed{2}.\nfinal answer: 2\n"


def test_quantize_int8_flag_loads_int8_linears(checkpoint, capsys):
    code, out, err = run(capsys, "--model", checkpoint, "--quantize", "int8", "--max-new-tokens", 4, "Hi")
    assert code == 0, err
    session = Session(checkpoint, quantize="int8")
    from minisail.fast.int8 import Int8Linear
    from minisail.fast.int8_dot import DotInt8Linear  # where the CPU's int8 dot products run (fast/int8_dot.py)

    assert any(isinstance(m, (Int8Linear, DotInt8Linear)) for m in session.model.modules())


@pytest.mark.parametrize("kernel", ["this CPU's oneDNN", "a stand-in"])
def test_bf16_on_cpu_is_packed_and_replies_the_same(checkpoint, kernel, request):
    from minisail.fast import packing

    if kernel == "a stand-in":
        request.getfixturevalue("onednn_packs_bf16")
    elif not packing.packing_available():
        pytest.skip(packing.packing_support().reason)
    packed = Session(checkpoint, dtype="bfloat16", generation=minisail.generate.GenerationConfig(max_new_tokens=8))
    plain = Session(checkpoint, dtype="bfloat16", pack=False,
                    generation=minisail.generate.GenerationConfig(max_new_tokens=8))  # fmt: skip
    assert any(isinstance(m, packing.PackedLinear) for m in packed.model.modules())
    assert not any(isinstance(m, packing.PackedLinear) for m in plain.model.modules())
    if kernel == "this CPU's oneDNN" and matvec.matvec_wanted():  # AMX: one-row products on torch.mv (matvec.py)
        assert any(isinstance(m, MatVecLinear) for m in packed.model.language_model.modules())
    question = "What animal is in the picture?"
    assert packed.ask(question, images=[IMAGE]) == plain.ask(question, images=[IMAGE])


def test_where_onednn_refuses_bf16_a_session_runs_plain_and_says_why(checkpoint, onednn_refuses_bf16):
    """The AVX2-only CPU: no crash, no packing, prefill in float32 (fast/upcast.py), the same reply as an unpacked
    session, and the reason logged."""
    from minisail.fast import packing, upcast

    lines = []
    config = minisail.generate.GenerationConfig(max_new_tokens=8)
    session = Session(checkpoint, dtype="bfloat16", generation=config, log=lines.append)
    plain = Session(checkpoint, dtype="bfloat16", pack=False, generation=config)
    assert not any(isinstance(m, packing.PackedLinear) for m in session.model.modules())
    assert any(isinstance(m, upcast.Float32ComputeLinear) for m in session.model.modules())
    assert any("prefill in float32" in line and "avx512bw" in line for line in lines)  # what, and why
    question = "What animal is in the picture?"
    assert session.ask(question, images=[IMAGE]) == plain.ask(question, images=[IMAGE])


def test_chat_cli_on_a_cpu_without_bf16_kernels(checkpoint, capsys, onednn_refuses_bf16):
    for extra in ((), ("--dtype", "bfloat16"), ("--quantize", "int8", "--dtype", "bfloat16")):
        code, out, err = run(capsys, "--model", checkpoint, *extra, "--max-new-tokens", 4, "Hi")
        assert code == 0 and "Traceback" not in err, err
        assert out.strip()


def test_without_a_dtype_the_session_says_which_it_chose(checkpoint):
    lines = []
    Session(checkpoint, log=lines.append)
    assert any(line.startswith("dtype: ") for line in lines)


@pytest.mark.parametrize("flag", [("--dtype", "float64"), ("--device", "tpu:9"), ("--device", "cuda:7")])
def test_a_bad_dtype_or_device_is_refused_before_anything_is_read(flag, capsys, monkeypatch, tmp_path):
    import minisail.loading

    def no_reading(*args, **kwargs):
        raise AssertionError("read something")

    monkeypatch.setattr(minisail.loading, "read_config", no_reading)
    code, _out, err = run(capsys, "--model", tmp_path, *flag, "--image", "missing.png", "Hi")
    assert code == 2 and "minisail: error:" in err and flag[1] in err


@pytest.mark.parametrize("flag", [["--max-new-tokens", "0"], ["--max-tiles", "5000"], ["--max-tiles", "x"]])
def test_a_bad_length_or_tile_count_is_refused_before_anything_is_read(flag, capsys, monkeypatch, tmp_path):
    import minisail.loading

    monkeypatch.setattr(minisail.loading, "read_config", lambda *a, **k: pytest.fail("read something"))
    with pytest.raises(SystemExit) as exit:
        main(["chat", "--model", str(tmp_path), *flag, "Hi"])
    assert exit.value.code == 2 and flag[0] in capsys.readouterr().err


def test_a_folder_that_is_not_a_checkpoint_is_named_as_such(capsys, tmp_path):
    code, _, err = run(capsys, "--model", tmp_path, "Hi")  # it was told it had no tokenizer files
    assert code == 2 and "has no config.json" in err
    code, _, err = run(capsys, "--model", tmp_path / "missing", "Hi")
    assert code == 2 and "checkpoint folder" in err and "does not exist" in err


def test_an_unknown_template_is_refused_before_the_weights_load(checkpoint, capsys, monkeypatch, tmp_path):
    import minisail.loading

    monkeypatch.setattr(minisail.loading, "fill_from_checkpoint", lambda *a, **k: pytest.fail("loaded weights"))
    code, _, err = run(capsys, "--model", checkpoint, "--template", "nope", "Hi")
    assert code == 2 and "unknown conversation template 'nope'" in err
    folder = shutil.copytree(checkpoint, tmp_path / "bad-template")
    config = json.loads((folder / "config.json").read_text())
    config["template"] = "nope"
    (folder / "config.json").write_text(json.dumps(config))
    code, _, err = run(capsys, "--model", folder, "Hi")
    assert code == 2 and "unknown conversation template 'nope'" in err


def test_a_template_of_the_other_kind_is_refused_before_the_weights_load(checkpoint, capsys, monkeypatch):
    import minisail.loading

    monkeypatch.setattr(minisail.loading, "fill_from_checkpoint", lambda *a, **k: pytest.fail("loaded weights"))
    code, _, err = run(capsys, "--model", checkpoint, "--template", "mm_default", "Hi")  # Yi-VL's, on InternVL
    assert code == 2 and "mm_default is Yi-VL's" in err and "'internvl2_5'" in err


def test_two_images_for_yi_vl_are_refused_before_the_weights_load(capsys, monkeypatch):
    from helpers.checkpoints import GOLDEN

    import minisail.loading

    monkeypatch.setattr(minisail.loading, "fill_from_checkpoint", lambda *a, **k: pytest.fail("loaded weights"))
    yi_vl = GOLDEN / "yi-vl-tiny" / "checkpoint"
    code, _, err = run(capsys, "--model", yi_vl, "--image", IMAGE, "--image", IMAGE, "Hi")
    assert code == 2 and "Yi-VL takes one image per conversation, not 2" in err
