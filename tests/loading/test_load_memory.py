"""Peak memory while loading a large sharded checkpoint: about one copy of the model, never two.

A synthetic InternVL checkpoint (a 5-layer InternViT and an InternLM2-shaped LLM with hidden 2048, MLP 8192 and a
256-token vocabulary, so nearly all bytes are decoder Linears) is written shard by shard, once per session, in bf16
(9 layers, 1.1 GB) and fp32 (5 layers, 1.2 GB). Each load runs in a fresh subprocess, which reports the model's
bytes (parameters and buffers), its resident set right before loading (the baseline: the interpreter with torch and
minisail, warmed up by loading a tiny checkpoint the same way) and its peak resident set (VmHWM) after loading and
reading every weight once:

    peak - baseline < 1.25 * model bytes

Measured (2-core machine; ratio = (peak - baseline) / model bytes; baseline ~300 MiB):
- fp32 checkpoint as fp32, 1.16 GiB: 1.04-1.08; bf16 as bf16, 1.03 GiB: 1.07. Renamed weights are views into the
  memory-mapped shards; the fused ones (qkv, gate_up) are read and joined one at a time.
- bf16 checkpoint as fp32, 2.06 GiB: 1.09-1.10. Each tensor is read and converted on its own.
- bf16 checkpoint with quantize="int8", 0.52 GiB: 1.19-1.28, bound 1.5. Each tensor is quantised as it is read:
  one fused layer's temporaries are a larger share of this small model. A float copy would add 2x.
- bf16 checkpoint with quantize="int4", 0.30 GiB: 1.66 (peak - baseline 507 MiB), bound 2.0; a float copy would
  add 3.5x.
The overshoot above 1.0 is mostly freed temporaries the C heap keeps (glibc malloc_trim returns ~90 MiB of it).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.checkpoints import GOLDEN, golden_config
from safetensors.torch import save_file

from minisail.checkpoint.export import to_official_state_dict
from minisail.models.registry import detect_family

if not Path("/proc/self/status").is_file():
    pytest.skip("peak memory is read from /proc/self/status (Linux)", allow_module_level=True)

LLM = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_attention_heads": 16,
    "num_key_value_heads": 4,
    "vocab_size": 256,
    "torch_dtype": "bfloat16",
}
SHARD_BYTES = 300 << 20
WARM_UP = GOLDEN / "internvl-internlm2-tiny" / "checkpoint"


def layer_value(index: int) -> float:
    """Every tensor of decoder layer `index` holds this one value (exact in bf16), so fused ones can be checked."""
    return (index + 1) / 16


def large_config(num_layers: int) -> dict:
    config = golden_config("internvl-internlm2-tiny")
    config["llm_config"] = {**config["llm_config"], **LLM, "num_hidden_layers": num_layers}
    config["hidden_size"] = LLM["hidden_size"]
    return config


def write_large_checkpoint(folder: Path, dtype: torch.dtype, num_layers: int) -> Path:
    """config.json + shards of ~300 MB + index, one shard in memory at a time."""
    folder.mkdir(parents=True)
    config = large_config(num_layers)
    (folder / "config.json").write_text(json.dumps(config))
    family = detect_family(config)
    with torch.device("meta"):
        model = family.build(family.parse(config))
    shapes = {name: t.shape for name, t in to_official_state_dict(model, family.weight_map(model.config)).items()}
    groups, current, size = [], [], 0
    for name, shape in shapes.items():  # in model order, so a shard holds consecutive layers
        current.append(name)
        size += shape.numel() * dtype.itemsize
        if size >= SHARD_BYTES:
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    weight_map = {}
    for k, names in enumerate(groups):
        shard = f"model-{k + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            layer = name.split("layers.")[1].split(".")[0] if "model.layers." in name else None
            value = layer_value(int(layer)) if layer is not None else 0.5
            tensors[name] = torch.full(shapes[name], value, dtype=dtype)
        save_file(tensors, folder / shard)
        weight_map.update(dict.fromkeys(names, shard))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


@pytest.fixture(scope="session")
def large_checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("large")
    yield {
        "bf16": write_large_checkpoint(root / "bf16", torch.bfloat16, num_layers=9),
        "fp32": write_large_checkpoint(root / "fp32", torch.float32, num_layers=5),
    }
    shutil.rmtree(root)  # 2.3 GB: not left behind in pytest's kept temporary folders


MEASURE = r"""
import gc, json, sys, time
import torch
import minisail

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

folder, warm_up, dtype, quantize = sys.argv[1:5]
quantize = None if quantize == "none" else quantize
# The baseline is the interpreter with torch and minisail warmed up: a tiny model loaded the same way first pulls in
# the lazy imports, library code pages and thread pools that any load needs, whatever the model's size.
tiny = minisail.load(warm_up, dtype=dtype, quantize=quantize)
del tiny
gc.collect()
baseline = status("VmRSS")
start = time.perf_counter()
model = minisail.load(folder, dtype=dtype, quantize=quantize)
seconds = time.perf_counter() - start
tensors = list(model.parameters()) + list(model.buffers())
for t in tensors:
    t.max()  # read every byte once, so mapped pages become resident (max: no promoted copy, unlike an int8 sum)
peak = status("VmHWM")
layers_ok = True
for i, layer in enumerate(model.language_model.layers):
    value = (i + 1) / 16
    for name, t in layer.state_dict().items():
        if name.endswith("scale"):
            layers_ok &= bool(torch.allclose(t, torch.full_like(t, value / 127)))
        elif name.endswith("scale_zeros"):  # int4: a constant group has scale 0 and zero = its value
            layers_ok &= bool((t[..., 0] == 0).all() and (t[..., 1] == value).all())
        elif t.dtype == torch.int8:
            layers_ok &= bool((t == 127).all())
        elif t.dtype == torch.uint8:  # int4 codes, two per byte: all 8 (code 8 means `zero`), in either layout
            layers_ok &= bool((t == 0x88).all())
        else:
            layers_ok &= bool((t == value).all())
print(json.dumps({
    "model_bytes": sum(t.numel() * t.element_size() for t in tensors),
    "baseline": baseline, "peak": peak, "seconds": seconds, "layers_ok": layers_ok,
    "dtypes": sorted({str(t.dtype) for t in tensors}),
}))
"""


@pytest.mark.parametrize(
    "checkpoint, dtype, quantize",
    [
        ("fp32", "float32", None),
        ("bf16", "bfloat16", None),
        ("bf16", "float32", None),
        ("bf16", "bfloat16", "int8"),
        ("bf16", "bfloat16", "int4"),
    ],
    ids=["fp32-as-fp32", "bf16-as-bf16", "bf16-as-fp32", "bf16-as-int8", "bf16-as-int4"],
)
def test_peak_memory_of_a_load_is_about_one_model(large_checkpoints, checkpoint, dtype, quantize):
    folder = large_checkpoints[checkpoint]
    done = subprocess.run(
        [sys.executable, "-c", MEASURE, str(folder), str(WARM_UP), dtype, quantize or "none"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = (report["peak"] - report["baseline"]) / report["model_bytes"]
    loaded_as = dtype + (f" + {quantize}" if quantize else "")
    print(
        f"{checkpoint} checkpoint as {loaded_as}: model {report['model_bytes'] / 2**30:.2f} GiB, baseline "
        f"{report['baseline'] / 2**20:.0f} MiB, peak {report['peak'] / 2**20:.0f} MiB, (peak - baseline) / model = "
        f"{ratio:.3f}, load {report['seconds']:.1f} s"
    )
    assert report["layers_ok"], "the loaded weights are not the values written"
    if not quantize:
        assert report["model_bytes"] >= 2**30
        assert ratio < 1.25
    else:
        # Quantising holds one fused layer's sources and int8 parts at a time (~1/8 of this 9-layer model), and the
        # C heap keeps some freed holes: a looser bound, still far below the bf16 checkpoint (2x the int8 model)
        # that a float copy of the model would add.
        assert report["model_bytes"] >= (2**29 if quantize == "int8" else 2**28)
        # int4 (0.30 GiB): measured 1.66. Its fixed temporaries (a fused layer's fp32 block, codes, the kernel
        # repack's int32 block: ~150-200 MiB whatever the layer count) are a larger share of a model 3.5x smaller
        # than the bf16 checkpoint; a float copy would add 3.5x, not 0.7x.
        assert ratio < (1.5 if quantize == "int8" else 2.0)
