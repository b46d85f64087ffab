"""`python -m minisail parity`: a case that cannot run is a FAIL line naming it while the others still run and the
summary and the JSON line still come; tolerances that are not finite numbers >= 0 are refused; the JSON is
standard (no NaN or Infinity)."""

import json
import math
import shutil

import pytest
from helpers.checkpoints import GOLDEN
from safetensors.torch import load_file, save_file

from minisail.cli import main
from minisail.parity import CaseResult

GOOD = GOLDEN / "internvl-qwen2-textonly"
WITH_IMAGES = GOLDEN / "internvl-qwen2-tiny"


def run(capsys, *argv):
    code = main(["parity", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def strict_json(line: str) -> dict:
    def refuse(constant):
        raise ValueError(f"{constant} is not standard JSON")

    return json.loads(line, parse_constant=refuse)


def test_a_case_that_cannot_run_fails_by_name_and_the_others_still_report(capsys, tmp_path):
    broken = tmp_path / "no-meta"
    shutil.copytree(WITH_IMAGES, broken)
    (broken / "meta.json").unlink()  # its image token id is in meta.json: the case cannot run without it
    code, out, err = run(capsys, GOOD, broken, GOOD, "--json")
    lines = out.strip().splitlines()
    assert code == 2 and "minisail: error: no-meta:" in err  # an error, as a case alone would be
    assert lines[0].startswith("PASS internvl-qwen2-textonly") and lines[2].startswith("PASS")
    assert lines[1].startswith("FAIL no-meta: could not run") and "meta.json is missing" in lines[1]
    assert lines[3] == "2 passed, 1 failed"
    result = strict_json(lines[-1])
    assert result["failed"] == ["no-meta"]
    assert "meta.json is missing" in result["results"][1]["error"] and result["results"][0]["error"] is None


def test_non_finite_logits_in_a_case_are_standard_json(capsys, tmp_path):
    case = tmp_path / "nan-expected"
    shutil.copytree(GOOD, case)
    expected = load_file(case / "expected.safetensors")
    expected["logits"][0, 0, 0] = math.nan  # expected logits with a NaN: the difference is NaN, not a pass
    save_file(expected, case / "expected.safetensors")
    code, out, _ = run(capsys, case, "--json")
    assert code == 1 and out.splitlines()[0].startswith("FAIL nan-expected")
    assert strict_json(out.strip().splitlines()[-1])["results"][0]["logits_max_abs_diff"] is None


@pytest.mark.parametrize("tolerance", ["inf", "nan", "-1", "abc"])
def test_a_tolerance_that_is_not_a_finite_number_at_least_zero_is_refused(capsys, tolerance):
    with pytest.raises(SystemExit) as exit:
        main(["parity", str(GOOD), "--tolerance", tolerance, "--json"])
    out, err = capsys.readouterr()
    assert exit.value.code == 2 and "finite number >= 0" in err
    refusal = strict_json(out.splitlines()[-1])  # a usage error ends --json's output in one JSON object too
    assert refusal["kind"] == "UsageError" and "finite number >= 0" in refusal["error"]


def test_a_result_that_could_not_run_is_standard_json():
    result = CaseResult.failed_to_run("some/case", ValueError("why"), 0.5)
    assert not result.passed and "could not run: ValueError: why" in result.line()
    assert strict_json(json.dumps(result.to_json()))["logits_max_abs_diff"] is None
