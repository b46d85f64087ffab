"""`python -m bench` at its smallest: the JSON it prints, the checkpoints it writes, its cache policy.

Timings are not asserted (they depend on the machine); the shape of the report is, and so is that the benchmark
compares like with like: the transformers-layout copy of its checkpoint computes the same numbers as minisail.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import paths

import minisail
from bench import checkpoints
from bench.__main__ import main
from bench.hf_names import internvl, to_official, to_transformers
from bench.presets import PRESETS, get_preset
from minisail.checkpoint.export import to_official_state_dict
from minisail.checkpoint.files import open_safetensors_folder
from minisail.models.registry import detect_family

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
KEYS = {"load_s", "peak_rss_gb", "vision_1tile_s", "vision_7tiles_s", "prefill_s", "ttft_s", "decode_tok_s"}


def test_quick_bench_prints_one_json_object_of_the_documented_form(tmp_path, capsys):
    dtypes = ["--dtype", "bf16", "--dtype", "int8", "--dtype", "int4"]
    assert main(["--preset", "tiny", "--quick", *dtypes, "--cache", str(tmp_path)]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    assert "decode, tok/s" in "\n".join(out[:-1])  # the table for people comes first
    assert {"preset", "machine", "roofline_decode_tok_s", "results"} <= set(report)
    assert report["preset"] == "tiny"
    assert report["machine"]["bandwidth_gb_s"] > 0 and report["machine"]["cores"] >= 1
    assert isinstance(report["machine"]["isa"], list) and report["machine"]["bf16_kernels"]  # figures carry the ISA
    frameworks = {"minisail", "transformers"} if HAS_TRANSFORMERS else {"minisail"}
    assert set(report["results"]["bf16"]) == frameworks  # --quick: never llama.cpp unless asked (--llama)
    assert "not asked for" in report["llama_cpp_skipped"] and report["ratios_vs_llama_cpp"] == {}
    for framework in frameworks:
        row = report["results"]["bf16"][framework]
        assert set(row) == KEYS
        assert row["vision_7tiles_s"] is None  # --quick skips the 7-tile encode
        assert all(row[k] > 0 for k in KEYS - {"vision_7tiles_s"}), row
    assert report["roofline_decode_tok_s"]["bf16"] > 0
    for quantized in ("int8", "int4"):  # weight-only loading: minisail only, compared with transformers' bf16
        assert set(report["results"][quantized]) == {"minisail"}
        assert set(report["results"][quantized]["minisail"]) == KEYS
        assert report["results"][quantized]["minisail"]["decode_tok_s"] > 0
    if HAS_TRANSFORMERS:
        assert report["ratios"]["bf16"]["decode_tok_s"] > 0
    notes = report["notes"]["bf16"]  # what bounds the figures: packing's share of the load, the matmuls alone
    assert notes["minisail_load_call_s"] > 0 and notes["minisail_pack_s"] >= 0
    from minisail.fast.packing import packing_support

    reasons = notes["minisail_fast_path_reasons"]  # what the fast paths were chosen by, in words
    assert packing_support().reason in reasons
    native = packing_support().available  # native bf16: packed vision tower; else float32 prefill (fast/cpu.py)
    assert ("packed for oneDNN" if native else "prefill in float32") in notes["minisail_fast_paths"]
    assert notes["minisail_load_call_s"] + notes["minisail_pack_s"] <= report["results"]["bf16"]["minisail"]["load_s"]
    assert notes["minisail_decode_matmuls_ms"] > 0 and notes["minisail_decode_step_ms"] > 0
    assert "minisail_decode_outside_ms" in notes  # the step beside its products: their difference
    assert "matrix products alone take" in "\n".join(out[:-1]) and "measured beside them" in "\n".join(out[:-1])
    # decode against the bandwidth read just before its round: one reading per round, the target from them
    assert len(notes["round_bandwidth_gb_s"]) == 1 and notes["round_bandwidth_gb_s"][0] > 0
    share = notes["minisail_decode_vs_round_roofline"]
    assert share > 0 and report["targets"]["bf16_decode_vs_roofline"]["value"] == share
    assert "each against the bandwidth read just before it" in "\n".join(out[:-1])


def test_decode_matmuls_are_the_decode_steps_linears(tmp_path):
    from bench.checkpoints import ensure_checkpoints
    from bench.presets import get_preset
    from bench.worker import MinisailRunner, bench_inputs

    preset = get_preset("tiny")
    folder = ensure_checkpoints(preset, tmp_path, transformers=False)["minisail"]
    runner = MinisailRunner(preset, folder, "bf16")
    with torch.inference_mode():
        runner.setup(*bench_inputs(preset))
        decoder = runner.model.language_model
        per_layer = sum(1 for m in decoder.layers[0].modules() if hasattr(m, "in_features"))
        assert len(runner.decode_linears) == per_layer * len(decoder.layers) + 1  # + lm_head
        assert runner.decode_linears[-1] is decoder.lm_head
        assert runner.decode_matmuls() > 0
        paired = runner.decode_step_and_matmuls(pairs=3)  # a real step after the prompt, beside the products
        assert paired["s"] > 0 and paired["step_s"] > 0
        steps, products = paired["pairs"]
        assert len(steps) == len(products) == 3 and all(t > 0 for t in steps + products)
        differences = sorted(step - alone for step, alone in zip(steps, products, strict=True))
        assert paired["outside_s"] == differences[1] and paired["s"] == sorted(products)[1]  # pair by pair


def test_official_checkpoint_is_sharded_bf16_and_round_trips(tmp_path):
    preset = get_preset("tiny")
    checkpoints.write_official(preset, tmp_path, seed=3)
    assert (tmp_path / "model.safetensors.index.json").is_file()
    tensors = open_safetensors_folder(tmp_path)
    assert {tensors.dtype(name) for name in tensors.keys()} == {torch.bfloat16}
    model = minisail.load(tmp_path)
    official = to_official_state_dict(model, detect_family(preset.config).weight_map(model.config))
    assert set(official) == set(tensors.keys())
    assert all(torch.equal(official[name], tensors.read(name)) for name in official)


def test_transformers_names_round_trip(tmp_path):
    """hf_names' one table, read both ways (the benchmark one way, the parity tests the other), is a bijection on
    a whole official checkpoint: every tensor renamed, the fused qkv split and joined back bit for bit."""
    checkpoints.write_official(get_preset("tiny"), tmp_path, seed=4)
    tensors = open_safetensors_folder(tmp_path)
    official = {name: tensors.read(name) for name in tensors.keys()}
    renamed = to_transformers(internvl(), official)
    assert "model.vision_tower.encoder.layer.0.attention.q_proj.weight" in renamed and "lm_head.weight" in renamed
    assert not any(".qkv." in name for name in renamed)
    back = to_official(internvl(), renamed)
    assert set(back) == set(official) and all(torch.equal(back[n], official[n]) for n in official)


def test_bench_runs_from_the_repository_root_in_a_fresh_process(tmp_path):
    """`python -m bench` as CI starts it: from the root of a checkout, the package not installed, its workers
    (`python -m bench.worker`) found through the repository root; the last line of the output is the JSON."""
    root = paths.ROOT
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    argv = ["--preset", "tiny", "--quick", "--dtype", "bf16", "--no-transformers", "--repeats", "1"]
    run = subprocess.run(
        [sys.executable, "-m", "bench", *argv, "--cache", str(tmp_path)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["preset"] == "tiny" and report["results"]["bf16"]["minisail"]["decode_tok_s"] > 0


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="needs the parity extra (transformers)")
def test_transformers_copy_computes_the_same_model(tmp_path):
    from bench.hf_side import hf_model_class
    from bench.worker import bench_inputs

    preset = get_preset("tiny")
    folders = checkpoints.ensure_checkpoints(preset, tmp_path, transformers=True)
    ours = minisail.load(folders["minisail"], dtype=torch.float32)
    ours.image_token_id = preset.image_token_id
    theirs = hf_model_class(preset).from_pretrained(folders["transformers"], dtype=torch.float32).eval()
    pixels, ids = bench_inputs(preset)
    with torch.inference_mode():
        torch.testing.assert_close(
            ours.encode_images(pixels[:2]), theirs.get_image_features(pixel_values=pixels[:2]).pooler_output
        )
        want = theirs(input_ids=ids, pixel_values=pixels[:1]).logits
        torch.testing.assert_close(ours(ids, None, pixels[:1]), want, atol=1e-4, rtol=1e-4)


def test_cache_is_reused_and_tidied(tmp_path):
    preset = get_preset("tiny")
    folder = checkpoints.ensure_checkpoints(preset, tmp_path, transformers=False)["minisail"]
    assert checkpoints.is_complete(folder)
    stamp = (folder / "config.json").stat().st_mtime_ns
    assert checkpoints.ensure_checkpoints(preset, tmp_path, transformers=False)["minisail"] == folder
    assert (folder / "config.json").stat().st_mtime_ns == stamp  # reused, not rewritten

    stale = tmp_path / f"tiny-v{checkpoints.FORMAT + 1}"  # another format version
    stale.mkdir()
    dead = checkpoints.entry_folder(tmp_path, preset) / ".official.partial-999999999"  # no such process
    dead.mkdir()
    mine = checkpoints.entry_folder(tmp_path, preset) / f".official.partial-{os.getpid()}"  # a live run's
    mine.mkdir()
    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    checkpoints.tidy_cache(tmp_path)
    assert not stale.exists() and not dead.exists() and mine.exists() and unrelated.exists()

    removed = checkpoints.clean_cache(tmp_path)
    assert removed and not checkpoints.entry_folder(tmp_path, preset).exists() and unrelated.exists()


def test_clean_removes_the_benchmarks_entries_only(tmp_path, capsys):
    # --clean once removed every folder named like <name>-v<N>: node-v18, a thesis-v2 with a user's files in it
    others = [tmp_path / "node-v18" / "lib", tmp_path / "thesis-v2", tmp_path / "tiny-v7" / "my-notes"]
    for folder in others:
        folder.mkdir(parents=True)
    (tmp_path / "thesis-v2" / "chapter1.tex").write_text("important")
    ours = [tmp_path / f"tiny-v{checkpoints.FORMAT}" / "official", tmp_path / "sail-vl-2b-v1" / "gguf-Q8_0"]
    for folder in ours:
        folder.mkdir(parents=True)
    assert main(["--clean", "--preset", "tiny", "--cache", str(tmp_path)]) == 0  # that preset's entries only
    assert not ours[0].exists() and ours[1].exists()
    assert main(["--clean", "--cache", str(tmp_path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert report["removed"] == [str(ours[1].parent)] and all(folder.exists() for folder in others)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--cache", ""], "--cache is empty"),
        (["--new-tokens", "1"], "--new-tokens must be at least 2"),
        (["--cache", "FILE"], "is a file, not a folder"),
    ],
)
def test_bad_options_end_in_a_json_error_before_any_work(tmp_path, capsys, argv, message):
    (tmp_path / "FILE").write_text("")
    argv = [str(tmp_path / "FILE") if a == "FILE" else a for a in argv]
    assert main(["--preset", "tiny", "--quick", "--no-transformers", "--dtype", "bf16", *argv]) == 2
    out, err = capsys.readouterr()
    assert message in err and message in json.loads(out.strip().splitlines()[-1])["error"]


def test_presets_have_the_real_shapes():
    from bench.models import build_on_meta

    def billions(name):
        model, _ = build_on_meta(PRESETS[name])
        return sum(p.numel() for p in model.state_dict().values()) / 1e9

    assert billions("sail-vl-2b") == pytest.approx(2.09, abs=0.01)  # FACTS.md: 2,089,762,304
    assert billions("mono-internvl-2b") == pytest.approx(3.11, abs=0.01)  # 3,111,355,392
    assert billions("internvl-chat-v1-5") == pytest.approx(5.536 + 0.116, abs=0.01)


def test_bad_arguments_are_clear_errors(tmp_path, capsys):
    assert main(["--preset", "tiny", "--repeats", "0", "--cache", str(tmp_path)]) == 2
    assert "--repeats must be at least 1" in capsys.readouterr().err


def test_compiled_decode_step_runs_and_is_reported(tmp_path, capsys):
    argv = ["--preset", "tiny", "--quick", "--compile", "--dtype", "bf16", "--no-transformers"]
    assert main([*argv, "--cache", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    notes = report["notes"]["bf16"]
    assert notes["minisail_compile_s"] > 0 and notes["minisail_rss_after_compile_gb"] > 0
    assert report["settings"]["compile"] is True and report["results"]["bf16"]["minisail"]["decode_tok_s"] > 0


def test_compile_mode_really_runs_the_decode_step_compiled(tmp_path):
    from torch._dynamo.utils import counters

    from bench.checkpoints import ensure_checkpoints
    from bench.presets import get_preset
    from bench.worker import MinisailRunner, bench_inputs

    preset = get_preset("tiny")
    folder = ensure_checkpoints(preset, tmp_path, transformers=False)["minisail"]
    runner = MinisailRunner(preset, folder, "bf16", compile=True)
    counters.clear()
    with torch.inference_mode():
        runner.setup(*bench_inputs(preset))
        assert hasattr(runner.model.language_model.decode_step, "_torchdynamo_orig_callable")
        times = runner.generate(6)
        products = runner.decode_step_and_matmuls()  # the products alone: no step of another cache size
    assert len(times) == 6 and products["s"] > 0 and "step_s" not in products
    assert counters["stats"]["unique_graphs"] == 1  # one graph for the whole generation, no recompiles
    assert counters["inductor"]["cpp_templated_kernel_counter"] > 0  # max-autotune's CPU GEMM templates ran


def test_where_compiling_fails_the_benchmark_decodes_eagerly_and_says_so(tmp_path, monkeypatch):
    from bench.checkpoints import ensure_checkpoints
    from bench.presets import get_preset
    from bench.worker import MinisailRunner, bench_inputs

    def compile_that_fails(function, **options):
        def compiled(*args, **kwargs):
            raise RuntimeError("C++ compile error: no compiler for this CPU")

        return compiled

    monkeypatch.setattr(torch, "compile", compile_that_fails)
    preset = get_preset("tiny")
    folder = ensure_checkpoints(preset, tmp_path, transformers=False)["minisail"]
    runner = MinisailRunner(preset, folder, "bf16", compile=True)
    with torch.inference_mode():
        runner.setup(*bench_inputs(preset))
        times = runner.generate(4)
        assert len(times) == 4 and len(runner.generate(3)) == 3
    assert "no compiler for this CPU" in runner.compile_failed and not runner.compile


def test_a_dtype_that_cannot_fit_in_memory_is_refused_with_the_reason(tmp_path, monkeypatch):
    """SAIL-VL2-8B on a 24 GB machine: bf16 (17.8 GB of weights) is skipped, saying why, before any worker starts
    (an out-of-memory kill would end the whole run); int4 fits."""
    from bench import runner

    params = checkpoints.parameter_count(get_preset("sail-vl2-8b"))
    monkeypatch.setattr(runner, "memory_available_bytes", lambda: 22 * 10**9)
    monkeypatch.setattr(runner, "start_worker", lambda *a: pytest.fail("no worker may start"))
    results, notes = runner.run_dtype(
        get_preset("sail-vl2-8b"), "bf16", {"minisail": tmp_path}, runner.Settings(), params, {}
    )
    assert results == {} and "loading bf16 needs about 21.5 GB of RAM and 19.8 GB may be used" in notes["skipped"]
    assert "out-of-memory kill" in notes["skipped"]
    assert runner.fitting_frameworks({"minisail": tmp_path}, "int4", params * runner.BYTES_PER_PARAM["int4"], 22e9)[0]
