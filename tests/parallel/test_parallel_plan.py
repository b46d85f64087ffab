"""The tensor-parallel split in one process (minisail/parallel/plan.py): which rows and columns each rank takes, the
refusals, and the launcher's checks that need no second process."""

from __future__ import annotations

import pytest
import torch
from helpers.paths import GOLDEN

import minisail
from minisail.checkpoint.keymaps import internlm2_wqkv
from minisail.cli import main
from minisail.errors import ConfigError, ParallelError
from minisail.llm.decoder_config import DecoderConfig
from minisail.parallel.data import map_over_ranks, share
from minisail.parallel.plan import DecoderShard, Slice, split_range


def config(heads=8, kv=2, inter=64, head_dim=4) -> DecoderConfig:
    return DecoderConfig(
        vocab_size=10, hidden_size=heads * head_dim, num_layers=1, num_heads=heads, num_kv_heads=kv,
        head_dim=head_dim, intermediate_size=inter, rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=64,
    )  # fmt: skip


def test_split_range_covers_everything_once_first_runs_longer():
    assert [split_range(25, 2, r) for r in range(2)] == [(0, 13), (13, 25)]
    for n in range(1, 30):
        for parts in range(1, 6):
            runs = [split_range(n, parts, r) for r in range(parts)]
            assert runs[0][0] == 0 and runs[-1][1] == n
            assert all(a[1] == b[0] for a, b in zip(runs, runs[1:], strict=False))
            assert max(b - a for a, b in runs) - min(b - a for a, b in runs) <= 1


def test_slice_of_one_row_run_is_a_view_and_columns_are_copies():
    t = torch.arange(24.0).view(6, 4)
    rows = Slice.of(0, [(1, 2), (2, 3)], 2)  # adjacent: merged into one run of rows 2..6
    assert rows.ranges == ((2, 6),) and rows.is_view() and rows(t).data_ptr() == t[2].data_ptr()
    columns = Slice.of(1, [(0, 1)], 2)
    assert torch.equal(columns(t), t[:, :2]) and columns(t).is_contiguous()


@pytest.mark.parametrize(("heads", "kv", "ranks"), [(8, 2, 2), (8, 4, 2), (8, 2, 4), (8, 1, 2), (8, 1, 8)])
def test_internlm2_grouped_wqkv_slices_are_the_rows_of_the_ranks_heads(heads, kv, ranks):
    """A rank's slice of the grouped wqkv, joined by the rank's own (local) regroup, is exactly the q rows of its
    query heads and the k/v rows of the kv head(s) they read, taken from the whole model's [q; k; v]."""
    full = config(heads, kv)
    d, hidden = full.head_dim, full.hidden_size
    wqkv = torch.randn((heads + 2 * kv) * d, hidden)
    q, k, v = internlm2_wqkv(full).join([wqkv]).split([heads * d, kv * d, kv * d])
    for rank in range(ranks):
        shard = DecoderShard(full, rank, ranks)
        (q0, q1), (k0, k1) = shard.q_heads, shard.kv_heads
        (piece,) = shard.qkv_slices(1)
        local = internlm2_wqkv(shard.local_config()).join([piece(wqkv)])
        want = torch.cat([q[q0 * d : q1 * d], k[k0 * d : k1 * d], v[k0 * d : k1 * d]])
        assert torch.equal(local, want)
        for h in range(q0, q1):  # every query head's kv head is held by the rank
            assert k0 <= h // (heads // kv) < k1


@pytest.mark.parametrize(("heads", "kv", "inter", "ranks"), [(8, 2, 64, 3), (6, 3, 64, 2), (8, 2, 63, 2)])
def test_a_split_that_does_not_divide_is_refused(heads, kv, inter, ranks):
    with pytest.raises(ConfigError, match=f"tensor parallel over {ranks} ranks"):
        DecoderShard(config(heads, kv, inter), 0, ranks)


def test_load_with_tp_needs_torch_distributed():
    with pytest.raises(ConfigError, match="torchrun"):
        minisail.load(GOLDEN / "yi-vl-tiny" / "checkpoint", tp=2)


def test_tp_without_torchrun_is_refused(monkeypatch, capsys):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["parity", str(GOLDEN / "yi-vl-tiny"), "--tp", "2"]) == 2
    assert "--tp 2 needs 2 processes: launch with `torchrun --nproc-per-node 2" in capsys.readouterr().err


def test_data_parallel_share_is_round_robin_and_one_process_is_a_loop():
    assert [i for i, _ in share(list("abcde"), of_rank=1, ranks=2)] == [1, 3]
    assert map_over_ranks(str.upper, ["a", "b"]) == ["A", "B"]
    with pytest.raises(ZeroDivisionError):
        map_over_ranks(lambda x: 1 // x, [1, 0, 2])


def test_the_fingerprint_samples_a_tensor_by_index_without_copying_it():
    from minisail.parallel.agree import _ends

    stored = torch.arange(60.0).view(6, 10)
    for tensor in (stored, stored.t(), stored[:, ::3], torch.tensor(7.0), torch.zeros(0)):
        assert torch.equal(_ends(tensor), torch.cat([tensor.reshape(-1)[:16], tensor.reshape(-1)[-16:]])
                           if tensor.numel() > 32 else tensor.reshape(-1))  # fmt: skip
    huge = torch.zeros(10**6, 1).expand(10**6, 10**6)  # strides (1, 0): flattening it would copy 4 TB
    with pytest.raises(RuntimeError):
        huge.reshape(-1)
    assert _ends(huge).shape == (32,)


def test_disagreeing_ranks_are_named_by_group_so_an_odd_rank_0_shows(monkeypatch):
    from minisail.parallel import agree

    same = {"config": "a", "dtype": "torch.float32", "tensors": "t", "values": "v"}
    everyone = [{**same, "values": "other"}, same, same, same]  # rank 0 loaded another copy
    monkeypatch.setattr(agree.dist, "get_world_size", lambda group=None: 4)
    monkeypatch.setattr(
        agree.dist, "all_gather_object", lambda out, mine, group=None: out.__setitem__(slice(None), everyone)
    )
    with pytest.raises(ParallelError, match=r"values differs: rank 0 \| ranks 1, 2, 3"):
        agree.check_ranks_agree(same)
    everyone = [same] * 4
    agree.check_ranks_agree(same)  # all the same: nothing said


def test_rank_0s_line_reader_retires_at_the_end_and_reports_a_failed_read():
    import io

    from minisail.parallel import launch

    stream = io.StringIO("a\n")
    assert launch._next_line(stream, 5) == "a\n"
    assert launch._next_line(stream, 5) == ""  # the end: the reader is retired
    assert launch._next_line(stream, 5) == ""  # and a later call says so again, as readline() would

    class Broken:
        def readline(self):
            raise UnicodeDecodeError("utf-8", b"\xe9", 0, 1, "invalid continuation byte")

    failed = launch._next_line(Broken(), 5)
    assert isinstance(failed, launch._ReadFailed) and "UnicodeDecodeError" in failed.reason
