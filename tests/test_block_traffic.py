"""The traffic counter (bench/_traffic.py) on a module counted by hand, and bench/block_traffic.py at the tiny shape."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from i2v.kernels import attention
from i2v.model.flops import training_flops

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from _traffic import TrafficCounter, distinct_elements, kind_of  # noqa: E402


def test_counter_on_a_module_counted_by_hand():
    # Linear(4 -> 5) on [2, 3, 4] -> GELU -> + a bias broadcast over [2, 3, 5] -> squared (z * z) -> a view.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, generator=g)
    linear = torch.nn.Linear(4, 5)
    bias = torch.randn(5, generator=g)
    counter = TrafficCounter()
    with torch.no_grad(), counter:
        y = F.gelu(linear(x))
        z = y + bias.expand(2, 3, 5)
        out = (z * z).view(6, 5)
    assert out.shape == (6, 5)
    fwd = counter.report()["forward"]
    # Launches: addmm (linear: its transpose and reshapes are views), gelu, add, mul; the view is free.
    assert fwd["launches"] == 4
    assert fwd["launches_by_kind"] == {"gemm": 1, "other": 3}
    # GEMM: 2 * M * N * K = 2 * 6 * 5 * 4.
    assert fwd["gemm_flops"] == 240 and fwd["attention_flops"] == 0
    # Bytes (fp32): gelu reads 30, writes 30; add reads 30 + the bias's 5 real elements, writes 30;
    # z * z reads z once (30) and writes 30.  (60 + 65 + 60) * 4.
    assert fwd["bytes"] == 740
    assert fwd["ops"] == {"aten.add": {"launches": 1, "bytes": 260}, "aten.gelu": {"launches": 1, "bytes": 240},
                          "aten.mul": {"launches": 1, "bytes": 240}, "aten.addmm": {"launches": 1, "bytes": 0}}
    # The GEMM's own traffic, kept apart: reads x (24), W (20), b (5), writes 30.
    assert fwd["gemm_bytes"] == (24 + 20 + 5 + 30) * 4
    assert counter.report()["backward"]["launches"] == 0


def test_views_allocations_and_in_place_writes():
    counter = TrafficCounter()
    a = torch.zeros(4, 6)
    with counter:
        a.t().unsqueeze(0).expand(2, 6, 4).permute(0, 2, 1)[:, 1:].detach()  # all views
        torch.empty(8)
        a[:, :3].copy_(torch.ones(3))  # ones: writes 3; copy_: reads the 3 source elements once, writes 12
        a.add_(1.0)  # reads 24, writes 24 (one write, though it returns its argument)
    fwd = counter.report()["forward"]
    assert fwd["launches"] == 3
    assert fwd["ops"]["aten.ones"]["bytes"] == 3 * 4
    assert fwd["ops"]["aten.copy_"]["bytes"] == (3 + 12) * 4
    assert fwd["ops"]["aten.add_"]["bytes"] == (24 + 24) * 4
    assert distinct_elements(torch.ones(5).expand(7, 5)) == 5
    assert kind_of(torch.ops.aten.transpose.int) == "view" and kind_of(torch.ops.aten.mm.default) == "gemm"
    for op in (attention.flash_attention_fwd, attention.flash_attention_bwd):
        assert kind_of(getattr(torch.ops.i2v, op._qualname.split("::")[1]).default) == "attention"


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("traffic") / "block_traffic.json"
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    r = subprocess.run([sys.executable, "bench/block_traffic.py", "--shape", "tiny", "--out", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "checkpointing all" in r.stdout and "top 10" in r.stdout
    return json.loads(out.read_text())


def test_tiny_block_phases(tiny_report):
    rep = tiny_report
    assert rep["mode"] == "meta-device proxy, not a GPU measurement"
    assert rep["shape"]["name"] == "tiny" and rep["shape"]["text"] == 8 and rep["shape"]["video"] == 3 * 8 * 8
    assert rep["commit"] and rep["torch"] == torch.__version__ and rep["diffusers"]
    none, full = rep["checkpointing"]["none"], rep["checkpointing"]["all"]
    for phase in ("forward", "recompute", "backward"):
        assert full[phase]["launches"] > 0 and full[phase]["bytes"] > 0
    assert none["recompute"]["launches"] == none["recompute"]["bytes"] == 0
    assert none["forward"] == full["forward"] and none["backward"] == full["backward"]
    # Our attention op: one forward launch, and one backward launch in each of forward, recompute and backward.
    for rep_ in (none, full):
        assert rep_["forward"]["ops"]["i2v.flash_attention_fwd"]["launches"] == 1
        assert rep_["backward"]["ops"]["i2v.flash_attention_bwd"]["launches"] == 1
    assert full["recompute"]["ops"]["i2v.flash_attention_fwd"]["launches"] == 1
    # The recompute stops early, after the last tensor the backward needs: never more than the forward.
    assert full["recompute"]["launches"] <= full["forward"]["launches"]
    assert full["recompute"]["gemm_flops"] == full["forward"]["gemm_flops"]
    # QK norm + RoPE: the fused op, once for Q and once for K, in forward and recompute, its backward in the
    # backward; diffusers' apply_rotary_emb never runs on this path.
    for phase, op in (("forward", "fwd"), ("recompute", "fwd"), ("backward", "bwd")):
        assert full[phase]["ops"][f"i2v.qk_norm_rope_{op}"]["launches"] == 2
        assert full[phase]["ops"][f"i2v.qk_norm_rope_{op}"]["bytes"] > 0
        assert "apply_rotary_emb" not in full[phase]["regions"]
    assert len(full["top_ops"]) == 10 and full["top_ops"][0]["bytes"] >= full["top_ops"][-1]["bytes"]
    # The block the trainer installs on CUDA (kernels.block auto): norm1, the attention's residual with norm2, and
    # the feed-forward's residual, one launch each way; none of the eager LayerNorms or slice copies they replace.
    for phase, op in (("forward", "fwd"), ("recompute", "fwd"), ("backward", "bwd")):
        for name in ("adaptive_norm", "residual_norm", "gated_residual"):
            assert full[phase]["ops"][f"i2v.{name}_{op}"]["launches"] == 1
    for phase in ("forward", "recompute", "backward"):
        assert not {"aten.native_layer_norm", "aten.native_layer_norm_backward", "aten.slice_backward"} & set(
            full[phase]["ops"])
    assert rep["block"] == "auto"


def test_tiny_block_with_torch_attention_counts_diffusers_rope_as_a_region():
    from block_traffic import count_block

    rep = count_block("tiny", "torch", "all", block="torch")  # diffusers' block and processor: no i2v op
    # diffusers' apply_rotary_emb on Q and K: 8 launches each (neg, stack, 3 casts, 2 muls, add), forward and
    # recompute; its autograd nodes' ops in the backward.
    rope = {p: rep[p]["regions"]["apply_rotary_emb"] for p in ("forward", "recompute", "backward")}
    assert rope["forward"] == rope["recompute"] and rope["forward"]["launches"] == 16
    assert rope["backward"]["launches"] > 0 and rope["backward"]["bytes"] > 0
    assert not any(op.startswith("i2v.") for p in ("forward", "backward") for op in rep[p]["ops"])


def test_custom_non_attention_ops_count_their_inputs_and_outputs():
    from i2v.kernels.qk_norm_rope import qk_norm_rope

    b, s, h, d, text = 1, 10, 3, 16, 4
    x = torch.empty(b, s, h, d, device="meta", dtype=torch.bfloat16).transpose(1, 2).requires_grad_()
    weight = torch.empty(d, device="meta", requires_grad=True)
    bias = torch.empty(d, device="meta", requires_grad=True)
    cos = torch.empty(s - text, d, device="meta")
    sin = torch.empty(s - text, d, device="meta")
    counter = TrafficCounter()
    with counter:
        out = qk_norm_rope(x, weight, bias, 1e-6, cos, sin, text)
        with counter.in_phase("backward"):
            out.backward(torch.empty_like(out))
    rep = counter.report()
    rows, elems = b * s * h, b * s * h * d
    fwd = rep["forward"]["ops"]["i2v.qk_norm_rope_fwd"]
    # Reads x (bf16), weight, bias, cos, sin (fp32); writes out (bf16), mean and rstd (fp32 per row).
    assert fwd == {"launches": 1, "bytes": elems * 2 + 2 * d * 4 + 2 * (s - text) * d * 4 + elems * 2 + 2 * rows * 4}
    assert kind_of(torch.ops.i2v.qk_norm_rope_fwd.default) == "other"
    bwd = rep["backward"]["ops"]["i2v.qk_norm_rope_bwd"]
    # Reads grad, x, weight, mean, rstd, cos, sin; writes dx, dweight, dbias.
    assert bwd == {"launches": 1, "bytes": 2 * elems * 2 + d * 4 + 2 * rows * 4 + 2 * (s - text) * d * 4
                   + elems * 2 + 2 * d * 4}


def test_tiny_block_flops_match_the_cost_model(tiny_report):
    sys.path.insert(0, str(REPO / "bench"))
    from block_traffic import arch_of, latent_shape

    arch = arch_of("tiny")
    frames, h, w = latent_shape(arch)
    one, two = (training_flops({**arch, "num_layers": n}, frames, h, w) for n in (1, 2))
    per_block_fwd, per_block_bwd = two.forward - one.forward, two.backward - one.backward
    full = tiny_report["checkpointing"]["all"]
    fwd, bwd = full["forward"], full["backward"]
    # The cost model's block forward is its linears (GEMMs) plus 4·S²·d of attention; backward twice each.
    s, d = 8 + 192, arch["num_attention_heads"] * arch["attention_head_dim"]
    assert fwd["attention_flops"] == 4 * s * s * d
    assert fwd["gemm_flops"] + fwd["attention_flops"] == per_block_fwd
    assert bwd["gemm_flops"] + bwd["attention_flops"] == per_block_bwd == 2 * per_block_fwd
    assert full["recompute"]["gemm_flops"] + full["recompute"]["attention_flops"] == per_block_fwd


def test_tiny_block_selective_recomputes_neither_qkv_nor_attention(tiny_report):
    from i2v.model.flops import training_flops

    sys.path.insert(0, str(REPO / "bench"))
    from block_traffic import arch_of, latent_shape

    arch = {**arch_of("tiny"), "num_layers": 1}
    frames, h, w = latent_shape(arch)
    sel, full = (tiny_report["checkpointing"][k] for k in ("selective", "all"))
    assert sel["forward"] == full["forward"] and sel["backward"] == full["backward"]
    assert sel["recompute"]["attention_flops"] == 0 and "i2v.flash_attention_fwd" not in sel["recompute"]["ops"]
    assert 0 < sel["recompute"]["gemm_flops"] < full["recompute"]["gemm_flops"]
    # What the counter sees run again is what the cost model prices as selective's recompute.
    assert sel["recompute"]["gemm_flops"] == training_flops(arch, frames, h, w, gradient_checkpointing="selective").recompute
