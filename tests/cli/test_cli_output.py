"""What the CLI prints stays readable whatever the text and the terminal: a --json line is one line (U+2028 and
U+0085 in a question would split it), and a terminal that is not UTF-8 gets escapes instead of a traceback."""

import json
import os
import subprocess
import sys

from minisail.cli import main


def test_a_json_line_stays_one_line_whatever_the_question_holds(capsys, qwen25_tokenizer_dir):
    question = "a\u2028b\u0085c \u00e9\u4e2d"
    code = main(["prompt", "--template", "Hermes-2", "--tokenizer", str(qwen25_tokenizer_dir), question, "--json"])
    out = capsys.readouterr().out
    assert code == 0
    result = json.loads(out.splitlines()[-1])  # str.splitlines() splits at U+2028 and U+0085 too
    assert question in result["query"]


def test_a_terminal_that_is_not_utf8_gets_escapes_not_a_traceback(qwen25_tokenizer_dir):
    env = {**os.environ, "PYTHONIOENCODING": "ascii"}
    argv = ["prompt", "--template", "internlm2-chat", "--tokenizer", str(qwen25_tokenizer_dir), "\u4e2d\u6587?"]
    done = subprocess.run([sys.executable, "-m", "minisail", *argv], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr
    assert "\\u4e2d" in done.stdout  # the question, escaped


def test_with_json_a_failure_still_ends_in_one_json_object(capsys, tmp_path):
    code = main(["tiles", str(tmp_path / "missing.jpg"), "--json"])
    out, err = capsys.readouterr()
    assert code == 2 and "minisail: error: image file not found" in err
    assert json.loads(out.splitlines()[-1]) == {
        "error": f"image file not found: {tmp_path / 'missing.jpg'}",
        "kind": "ImageError",
    }
