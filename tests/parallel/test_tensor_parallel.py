"""Tensor parallel over 2 local gloo ranks (minisail/parallel/): the same numbers as one process, half the
sharded bytes per rank, and the failures refused with a message instead of a hang.

The two-rank runs go through `torchrun --standalone` (tests/helpers/tp_worker.py and the CLI), as a user's would.
Besides every golden case, two random checkpoints cover what the cases do not: fewer key/value heads than ranks
(1 kv head, replicated on both ranks; InternLM2's grouped wqkv and Qwen2's q/k/v with biases) and an InternViT
whose heads and MLP columns do not split evenly (5 heads: 3 + 2, like InternViT-6B's 25 = 13 + 12).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers.checkpoints import golden_config, randomize_, write_checkpoint
from helpers.paths import GOLDEN, ROOT

from minisail.checkpoint.export import to_official_state_dict
from minisail.models.registry import detect_family

CASES = sorted(p.name for p in GOLDEN.iterdir() if (p / "checkpoint").is_dir())
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]


def env(**extra) -> dict:
    out = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    out.update({"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MINISAIL_DIST_TIMEOUT": "60", **extra})
    return out


def random_checkpoint(folder, case: str, llm: dict, vision: dict | None = None, seed: int = 0):
    """A golden case's config with some sizes changed, random float32 weights, official layout."""
    config = copy.deepcopy(golden_config(case))
    config["llm_config"].update(llm)
    config["vision_config"].update(vision or {})
    family = detect_family(config)
    parsed = family.parse(family.complete_config(folder, config))
    torch.manual_seed(seed)
    model = randomize_(family.build(parsed), seed)
    return write_checkpoint(folder, config, to_official_state_dict(model, family.weight_map(parsed)))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """tp_worker.py's results for every golden case and the two random checkpoints, from rank 0 and rank 1."""
    tmp = tmp_path_factory.mktemp("tp")
    internlm2 = random_checkpoint(
        tmp / "internlm2-kv1", "internvl-internlm2-tiny", {"num_key_value_heads": 1}, {"hidden_size": 80,
        "num_attention_heads": 5, "intermediate_size": 129})  # fmt: skip
    qwen2 = random_checkpoint(tmp / "qwen2-kv1", "internvl-qwen2-tiny", {"num_key_value_heads": 1})
    checkpoints = [str(GOLDEN / case / "checkpoint") for case in CASES] + [str(internlm2), str(qwen2)]
    out = tmp / "results.json"
    run = subprocess.run(
        [*TORCHRUN, str(ROOT / "tests/helpers/tp_worker.py"), str(out), *checkpoints],
        env=env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = json.loads(out.read_text())["ranks"]
    return [{case_name(r["checkpoint"]): r for r in rank} for rank in ranks]


def case_name(checkpoint: str) -> str:  # a case's folder name, or the random checkpoint's
    parts = checkpoint.rstrip("/").split("/")
    return parts[-2] if parts[-1] == "checkpoint" else parts[-1]


NAMES = [*CASES, "internlm2-kv1", "qwen2-kv1"]


@pytest.mark.parametrize("name", NAMES)
def test_two_ranks_give_one_process_numbers(two_ranks, name):
    for rank, results in enumerate(two_ranks):
        result = results[name]
        assert result["logits_diff"] <= 1e-5, (rank, result)
        assert result.get("vision_diff", 0.0) <= 1e-5, (rank, result)
        assert result["tokens_equal"], (rank, result)


@pytest.mark.parametrize("name", NAMES)
def test_each_rank_holds_half_the_sharded_bytes(two_ranks, name):
    for results in two_ranks:
        whole, split = results[name]["bytes"]["whole"], results[name]["bytes"]["split"]
        if name.endswith("kv1"):  # the one kv head is on both ranks: a little over half
            assert 0.5 < split["decoder_layers"] / whole["decoder_layers"] < 0.6
        else:  # norms are replicated (tiny)
            assert 0.5 <= split["decoder_layers"] / whole["decoder_layers"] < 0.52
        assert split["all"] < whole["all"]
        if results[name]["vit_sharded"]:
            assert 0.4 < split["vit_layers"] / whole["vit_layers"] < 0.62  # 5 heads: 3 on rank 0, 2 on rank 1


def test_internvit_heads_split_unevenly(two_ranks):
    """Rank 0 holds 3 of the 5 heads and 65 of the 129 MLP columns, rank 1 the rest: more bytes on rank 0."""
    rank0, rank1 = (results["internlm2-kv1"]["bytes"]["split"]["vit_layers"] for results in two_ranks)
    assert rank0 > rank1


def test_data_parallel_parity_splits_the_cases():
    cases = [str(GOLDEN / case) for case in CASES[:3]]
    run = subprocess.run([*TORCHRUN, "-m", "minisail", "parity", *cases, "--json"], env=env(), capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])  # printed once, by rank 0
    assert [r["case"] for r in report["results"]] == CASES[:3] and not report["failed"]
    assert run.stdout.count("passed,") == 1


def test_tp_must_match_the_world_size():
    case = str(GOLDEN / CASES[0])
    run = subprocess.run([*TORCHRUN, "-m", "minisail", "parity", case, "--tp", "3"], env=env(), capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode != 0
    assert "--tp 3 but torchrun started 2 processes" in run.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_rank_that_never_comes_is_a_timeout_not_a_hang():
    extra = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    run = subprocess.run(
        [sys.executable, "-m", "minisail", "parity", str(GOLDEN / CASES[0]), "--tp", "2"],
        env={**env(**extra), "MINISAIL_DIST_TIMEOUT": "3"}, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 2
    assert "could not join the process group within 3 s" in run.stderr and "did every rank start?" in run.stderr


def test_a_failing_rank_stops_the_others():
    """Rank 1 fails before the first all-reduce (its case folder is missing); rank 0, already loading and running,
    stops at its next collective with a message naming the cause, instead of waiting for rank 1 forever."""
    common = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    command = [sys.executable, "-m", "minisail", "parity"]
    rank0 = subprocess.Popen([*command, str(GOLDEN / CASES[0]), "--tp", "2"], env=env(RANK="0", **common),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    rank1 = subprocess.run([*command, str(GOLDEN / "no-such-case"), "--tp", "2"], env=env(RANK="1", **common),
                           capture_output=True, text=True, timeout=120)  # fmt: skip
    _out, err = rank0.communicate(timeout=120)
    assert rank1.returncode == 2 and "rank 1 of 2:" in rank1.stderr and "inputs.safetensors is missing" in rank1.stderr
    assert rank0.returncode == 2
    assert "rank 0 of 2: a collective with the other ranks failed" in err and "another rank stopped" in err


def test_chat_over_two_ranks_says_what_one_process_says(tmp_path):
    """`torchrun ... chat --tp 2` on a chat-ready checkpoint (real Qwen2.5 tokenizer, tied lm_head, 1 kv head):
    the same reply as one process, printed once (by rank 0)."""
    from helpers.chat_checkpoint import IMAGE, build_chat_checkpoint

    folder = build_chat_checkpoint(tmp_path / "chat")
    args = ["chat", "--model", str(folder), "--image", str(IMAGE), "What is it?", "--max-new-tokens", "8",
            "--dtype", "float32"]  # fmt: skip
    one = subprocess.run([sys.executable, "-m", "minisail", *args], env=env(), capture_output=True, text=True,
                         timeout=300)  # fmt: skip
    two = subprocess.run([*TORCHRUN, "-m", "minisail", *args, "--tp", "2"], env=env(), capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert one.returncode == 0 and two.returncode == 0, two.stderr[-3000:]
    assert one.stdout.strip() and two.stdout == one.stdout


@pytest.mark.parametrize(
    ("llm", "vision", "tensor"),
    [
        ({"intermediate_size": 64}, {}, "mlp.gate_proj.weight"),  # 128 stored: half the MLP would load silently
        ({"vocab_size": 384}, {}, "embed_tokens.weight"),  # 400 stored: 16 rows of the vocabulary dropped
        ({}, {"intermediate_size": 64}, "mlp.fc1.weight"),  # the vision tower's MLP, sharded too
    ],
)
def test_a_config_that_contradicts_the_weights_is_refused_as_one_process_refuses_it(tmp_path, llm, vision, tensor):
    """Each rank sees only its slices; the whole tensor's size along the split is checked against the config."""
    folder = shutil.copytree(GOLDEN / "internvl-qwen2-tiny", tmp_path / "case")
    config = json.loads((folder / "checkpoint" / "config.json").read_text())
    config["llm_config"].update(llm)
    config["vision_config"].update(vision)
    (folder / "checkpoint" / "config.json").write_text(json.dumps(config))
    one = subprocess.run([sys.executable, "-m", "minisail", "parity", str(folder)], env=env(), capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    two = subprocess.run([*TORCHRUN, "-m", "minisail", "parity", str(folder), "--tp", "2"], env=env(),
                         capture_output=True, text=True, timeout=300)  # fmt: skip
    assert "CheckpointError" in one.stdout + one.stderr and "the config does not match the weights" in one.stderr
    assert two.returncode != 0, two.stdout + two.stderr[-2000:]  # torchrun: 1 when a rank exits 2
    for rank in (0, 1):
        assert f"rank {rank} of 2: " in two.stderr and tensor in two.stderr
    assert "the config does not match the weights" in two.stderr and "collective" not in two.stderr


def test_an_interactive_chat_may_wait_for_its_user_longer_than_the_failure_timeout(tmp_path):
    """Rank 0 tells the others "not yet" every third of MINISAIL_DIST_TIMEOUT while its user types: a user who types
    after the timeout still gets the reply (the session used to die with 'a collective ... timed out')."""
    from helpers.chat_checkpoint import build_chat_checkpoint

    folder = build_chat_checkpoint(tmp_path / "chat")
    args = ["chat", "--model", str(folder), "--max-new-tokens", "4", "--dtype", "float32", "--tp", "2"]
    pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run = subprocess.Popen([*TORCHRUN, "-m", "minisail", *args], env=env(MINISAIL_DIST_TIMEOUT="3"), **pipes)
    time.sleep(8)  # the ranks have loaded and wait for the first line longer than the 3 s timeout
    out, err = run.communicate("What is it?\n/exit\n", timeout=300)
    assert run.returncode == 0, err[-3000:]
    assert out.strip() and "timed out" not in err and "collective" not in err


def test_a_rank_whose_data_parallel_share_runs_past_the_timeout_is_reported_not_waited_for(tmp_path):
    """A rank that finished its share waits for the others within MINISAIL_DIST_TIMEOUT (a hung rank must not be
    waited for forever); past it, a ParallelError that names the setting."""
    script = tmp_path / "uneven.py"
    script.write_text(
        "import sys, time\n"
        "from minisail.parallel import launch\n"
        "from minisail.parallel.data import map_over_ranks\n"
        "launch.start(None)\n"
        "try:\n"
        "    map_over_ranks(lambda seconds: time.sleep(seconds) or seconds, [6.0, 0.0])  # rank 0: 6 s of work\n"
        "except Exception as error:\n"
        "    print(f'rank {launch.rank()}: {type(error).__name__}: {error}', file=sys.stderr)\n"
        "finally:\n"
        "    launch.stop()\n"
    )
    run = subprocess.run([*TORCHRUN, str(script)], env=env(MINISAIL_DIST_TIMEOUT="2"), capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert "rank 1: ParallelError: a collective with the other ranks failed" in run.stderr, run.stderr[-3000:]
    assert "MINISAIL_DIST_TIMEOUT" in run.stderr


def test_a_ranks_own_error_stays_its_own_and_only_the_waiting_rank_blames_a_peer(tmp_path):
    script = tmp_path / "own_error.py"
    script.write_text(
        "import sys\n"
        "from minisail.parallel import launch\n"
        "launch.start(None)\n"
        "try:\n"
        "    with launch.peers_failing():\n"
        "        if launch.rank() == 1:\n"
        "            raise RuntimeError('a bug of rank 1 outside any collective')\n"
        "        launch.finish()  # rank 0 waits for rank 1, which has stopped\n"
        "except Exception as error:\n"
        "    print(f'rank {launch.rank()}: {type(error).__name__}: {error}', file=sys.stderr)\n"
        "finally:\n"
        "    launch.stop()\n"
    )
    run = subprocess.run([*TORCHRUN, str(script)], env=env(), capture_output=True, text=True, timeout=300)
    assert "rank 1: RuntimeError: a bug of rank 1 outside any collective" in run.stderr  # not put on the peers
    assert "rank 0: ParallelError: a collective with the other ranks failed" in run.stderr, run.stderr[-3000:]


AGREE = """
import sys, torch, minisail
from minisail.parallel import launch
launch.start(2)
rank = launch.rank()
folder, dtype = (sys.argv[1], torch.float32) if rank == 0 else (sys.argv[2], getattr(torch, sys.argv[3]))
try:
    minisail.load(folder, dtype=dtype, tp=2)
    said = f"rank {rank}: loaded"
except Exception as error:
    said = f"rank {rank}: {type(error).__name__}: {error}"
finally:
    launch.stop()
with open(f"{sys.argv[4]}.{rank}", "w") as out:  # one file per rank: their stderr lines can interleave
    out.write(said)
"""


def test_ranks_that_would_load_different_models_are_refused_before_any_weight(tmp_path):
    """Same shapes, other weights gave wrong logits on every rank; another dtype a gloo abort with no word."""
    from safetensors.torch import load_file, save_file

    script = tmp_path / "agree.py"
    script.write_text(AGREE)
    case = GOLDEN / "internvl-qwen2-tiny" / "checkpoint"
    other = shutil.copytree(case, tmp_path / "other")
    weights = load_file(other / "model.safetensors")
    name = next(k for k in sorted(weights) if k.endswith("mlp.down_proj.weight"))
    weights[name] = weights[name] + 1  # the same shapes and names, another model
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})

    def run(folder, dtype):
        said = tmp_path / f"said-{dtype}-{folder.name}"
        subprocess.run([*TORCHRUN, str(script), str(case), str(folder), dtype, str(said)], env=env(),
                       capture_output=True, text=True, timeout=300)  # fmt: skip
        return [Path(f"{said}.{rank}").read_text() for rank in (0, 1)]

    assert run(case, "float32") == ["rank 0: loaded", "rank 1: loaded"]
    for folder, dtype, part in ((case, "bfloat16", "dtype differs: rank 0 (torch.float32) | rank 1 (torch.bfloat16)"),
                                (other, "float32", "values differs: rank 0 | rank 1")):  # fmt: skip
        lines = run(folder, dtype)
        assert len(lines) == 2 and all("ParallelError: the ranks are loading different models" in x for x in lines)
        assert all(part in line for line in lines), lines


def test_a_turn_refused_for_memory_is_refused_on_every_rank_and_the_chat_goes_on(tmp_path):
    """The KV-cache check reads the host's free memory; ranks on hosts that differ decided differently, and the one
    that refused went back to reading the next line while the others ran the prefill: both waited until the
    timeout. The ranks now use the smallest memory any of them has."""
    from helpers.chat_checkpoint import build_chat_checkpoint

    folder = build_chat_checkpoint(tmp_path / "chat")
    script = tmp_path / "low_memory_rank.py"
    script.write_text(
        "import os, sys\n"
        "if os.environ['RANK'] == '1':  # another host, almost no memory free\n"
        "    import minisail.system\n"
        "    minisail.system.available_memory_bytes = lambda: 1000\n"
        "from minisail.cli import main\n"
        f"sys.exit(main(['chat', '--model', {str(folder)!r}, '--dtype', 'float32', '--max-new-tokens', '4', "
        "'--tp', '2']))\n"
    )
    run = subprocess.run([*TORCHRUN, str(script)], input="What is it?\nAgain?\n/exit\n", env=env(), text=True,
                         capture_output=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("the KV cache for") == 4  # two turns, refused on both ranks
    assert "collective" not in run.stderr and "timed out" not in run.stderr


def test_an_interactive_chat_ends_when_another_rank_dies_mid_turn(tmp_path):
    """A collective's failure is a ParallelError, a MinisailError: the chat loop, which keeps going after a turn's
    own error, must not keep going after that one (rank 0 would wait for its user with its peer gone)."""
    from helpers.chat_checkpoint import build_chat_checkpoint

    folder = build_chat_checkpoint(tmp_path / "chat")
    script = tmp_path / "dies.py"
    script.write_text(
        "import os, sys\n"
        "if os.environ['RANK'] == '1':\n"
        "    import minisail.generate\n"
        "    minisail.generate.decode_step = lambda *args: os._exit(3)  # dies at its first decode step\n"
        "from minisail.cli import main\n"
        f"sys.exit(main(['chat', '--model', {str(folder)!r}, '--dtype', 'float32', '--max-new-tokens', '6', "
        "'--tp', '2']))\n"
    )
    common = {"WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ranks = [subprocess.Popen([sys.executable, str(script)], env=env(RANK=str(r), **common), **pipes) for r in (0, 1)]
    ranks[0].stdin.write("What is it?\n")  # and no more: a user thinking about the next question
    ranks[0].stdin.flush()
    try:  # at once, not at the next "not yet" (a third of the 60 s timeout), when the turn's error is not swallowed
        assert ranks[0].wait(timeout=15) == 2
    finally:
        for process in ranks:
            process.kill()
    assert "rank 0 of 2: a collective with the other ranks failed" in ranks[0].stderr.read()


def test_unreadable_input_on_rank_0_ends_every_rank_with_the_reason(tmp_path):
    """The stdin thread died on bytes that are not UTF-8 and rank 0 said "not yet" forever: a silent hang."""
    from helpers.chat_checkpoint import build_chat_checkpoint

    folder = build_chat_checkpoint(tmp_path / "chat")
    args = ["chat", "--model", str(folder), "--max-new-tokens", "2", "--dtype", "float32", "--tp", "2"]
    run = subprocess.run([*TORCHRUN, "-m", "minisail", *args], input=b"caf\xe9?\n/exit\n", capture_output=True,
                         env=env(PYTHONIOENCODING="utf-8", MINISAIL_DIST_TIMEOUT="3"), timeout=120)  # fmt: skip
    err = run.stderr.decode(errors="replace")
    assert run.returncode != 0 and "rank 0 could not read standard input (UnicodeDecodeError" in err, err[-3000:]
