"""The optimizer the trainer builds (i2v.train.optim) and the DeepSpeed settings that keep its step free of host syncs."""

import torch

from i2v.config import load_config, resolve
from i2v.train.ds_config import build_deepspeed_config
from i2v.train.optim import build_optimizer, fused_adamw, optimizer_name


def test_fused_adamw_on_cuda_only_and_the_cpu_optimizer_is_the_default_one():
    assert fused_adamw("cuda") and fused_adamw(torch.device("cuda", 3)) and fused_adamw("cuda:1")
    assert not fused_adamw("cpu") and not fused_adamw(torch.device("cpu")) and not fused_adamw("meta")
    cfg = load_config("configs/tiny.yaml")
    w = torch.nn.Parameter(torch.ones(3))
    cpu = build_optimizer(cfg, [{"params": [w]}], "cpu")
    t = cfg.train
    default = torch.optim.AdamW([w], lr=t.lr, betas=tuple(t.betas), eps=t.eps, weight_decay=t.weight_decay)
    assert cpu.defaults == default.defaults  # exactly what the bit-exact resume tests were written against
    assert optimizer_name(cpu) == "torch.AdamW"
    # torch's fused AdamW is built the same way wherever; its parameters move to CUDA in the engine
    fused = build_optimizer(cfg, [{"params": [w]}], "cuda")
    assert fused.defaults["fused"] is True and optimizer_name(fused) == "torch.AdamW(fused)"
    assert optimizer_name(torch.optim.AdamW([w], foreach=True)) == "torch.AdamW(foreach)"
    assert optimizer_name(torch.optim.SGD([w])) == "torch.SGD"


def test_deepspeed_throughput_timer_is_off_and_bf16_skips_a_non_finite_step():
    for precision in ("fp32", "bf16"):
        cfg = load_config("configs/tiny.yaml", [f"deepspeed.precision={precision}"])
        ds = build_deepspeed_config(cfg, resolve(cfg, 1))
        assert ds["timers"] == {"throughput": {"enabled": False}} and ds["wall_clock_breakdown"] is False
        assert ds["bf16"].get("check_grad_overflow", False) == (precision == "bf16")
    cfg = load_config("configs/tiny.yaml", ["deepspeed.extra={timers: {throughput: {enabled: true}}}"])
    assert build_deepspeed_config(cfg, resolve(cfg, 1))["timers"] == {"throughput": {"enabled": True}}
