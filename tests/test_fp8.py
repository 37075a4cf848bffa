"""Float8 (`model.fp8`): where the float8 layers go, the e4m3 base's rounding and bytes, real training
runs with each setting, and a LoRA file trained on the float8 base that diffusers loads on the original.

Whether float8 hurts learning is measured by bench/fp8_quality.py (the demo recipe, minutes per run);
here only equality, shapes, bytes and that it trains."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from processor_models import block_outputs_and_grads
from runs import tiny_arch, train

from i2v.config import ModelConfig, load_config
from i2v.config.schema import FP8Config, LoRAConfig
from i2v.core.errors import ConfigError
from i2v.model.adapters import with_lora
from i2v.model.fp8 import (E4M3_MAX, Float8StoredLinear, apply_fp8_compute, compute_targets, dequantize,
                           quantize_e4m3, store_base_in_float8)
from i2v.model.transformer import build_transformer
from i2v.plan.memory import ParamCounts, ZeroSettings, state_bytes

pytest.importorskip("torchao")
from torchao.float8.float8_linear import Float8Linear  # noqa: E402
from torchao.float8.config import ScalingGranularity  # noqa: E402
from torchao.float8.float8_scaling_utils import hp_tensor_to_float8_dynamic  # noqa: E402

LORA = LoRAConfig(rank=4, alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "ff.net.2"],
                  extra_trainable=["proj_out"])


def tiny(**model):
    return build_transformer(ModelConfig(arch=tiny_arch(), init_std=0.2, **model))


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_float8_layers_are_the_blocks_projections_and_feed_forward_and_nothing_else(recipe):
    model = tiny()
    reference = tiny()
    names = apply_fp8_compute(model, recipe, "cpu", log=lambda line: None)
    converted = sorted(n for n, m in model.named_modules() if isinstance(m, Float8Linear))
    per_block = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ff.net.0.proj", "ff.net.2"]
    assert converted == sorted(names) == sorted(f"transformer_blocks.{i}.{n}" for i in range(2) for n in per_block)
    kept = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert {n.split(".")[-2] for n in kept if n.startswith("transformer_blocks.")} == {"norm1", "norm2"}
    assert "proj_out" in kept and "patch_embed.text_proj" in kept
    # A compute choice: the same parameters under the same names, so checkpoints do not change.
    assert list(model.state_dict()) == list(reference.state_dict())
    layer, plain = model.transformer_blocks[0].ff.net[2], reference.transformer_blocks[0].ff.net[2]
    h = torch.randn(2, 8, 256)
    out, want = layer(h), plain(h)
    assert 0 < (out - want).abs().max() < 0.1 * want.abs().max()  # quantised, close
    if recipe == "rowwise":
        # exact per-row scales: a row's largest magnitude is e4m3's 448 exactly, so it comes back unchanged
        x = torch.tensor([[3.3, -0.3, 0.01]])  # a power-of-two scale would give back 3.25
        cast = hp_tensor_to_float8_dynamic(x, torch.float8_e4m3fn, layer.linear_mm_config,
                                           scaling_granularity=ScalingGranularity.AXISWISE, axiswise_dim=-1,
                                           round_scales_to_power_of_2=layer.config.round_scales_to_power_of_2)
        assert cast.to_original_precision()[0, 0].item() == pytest.approx(3.3, rel=1e-6)


def test_a_block_with_float8_layers_compiles_as_one_graph_and_matches_eager():
    from torch._dynamo.utils import counters

    from i2v.model.transformer import rotary_embeddings

    model = tiny()
    apply_fp8_compute(model, "tensorwise", "cpu", log=lambda line: None)
    block, c = model.transformer_blocks[0], model.config
    g = torch.Generator().manual_seed(1)
    video, text = torch.randn(2, 3 * 8 * 8, 64, generator=g), torch.randn(2, 8, 64, generator=g)
    temb = torch.randn(2, c.time_embed_dim, generator=g)
    rotary = rotary_embeddings(c, 3, 16, 16, "cpu")

    def run(fn):
        return block_outputs_and_grads(block, fn, video, text, temb, rotary)

    eager = run(block)
    torch._dynamo.reset()
    counters.clear()
    compiled = run(torch.compile(block, fullgraph=True, dynamic=False, backend="aot_eager"))
    assert not counters["graph_break"] and counters["stats"]["unique_graphs"] == 1
    for ours, ref in zip(compiled, eager):
        assert ((ours - ref).abs().max() / ref.abs().max()).item() <= 1e-5


def test_a_layer_whose_dimensions_are_not_multiples_of_16_is_left_out_and_named():
    model = tiny()
    model.transformer_blocks[1].ff.net[2] = torch.nn.Linear(256, 72)
    chosen, skipped = compute_targets(model)
    assert "transformer_blocks.1.ff.net.2" not in chosen
    assert ("transformer_blocks.1.ff.net.2", "256 -> 72 is not a multiple of 16") in skipped
    lines = []
    apply_fp8_compute(model, "tensorwise", "cpu", log=lines.append)
    assert "256 -> 72 is not a multiple of 16" in lines[0] and "emulated: no float8 matmul on cpu" in lines[0]


def test_the_e4m3_base_is_within_e4m3_rounding_of_the_original():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g) * torch.logspace(-3, 1, 64)[:, None]  # rows of very different scales
    w[5] = 0  # an all-zero row must not divide by zero
    stored, scale = quantize_e4m3(w)
    assert stored.dtype == torch.float8_e4m3fn and scale.shape == (64,)
    back = dequantize(stored, scale, torch.float32)
    # 3 mantissa bits: half a step is 2^-4 of the value; below e4m3's smallest normal (2^-6) the step is 2^-9.
    bound = torch.maximum(w.abs() * 2**-4, scale[:, None] * 2**-10) * (1 + 1e-6)
    assert ((back - w).abs() <= bound).all()
    assert torch.equal(back[5], torch.zeros(96))
    assert torch.allclose(back.abs().amax(dim=1)[w.abs().amax(dim=1) > 0], w.abs().amax(dim=1)[w.abs().amax(dim=1) > 0])
    assert (stored.float().abs().amax(dim=1)[w.abs().amax(dim=1) > 0] == E4M3_MAX).all()


def test_the_float8_base_keeps_the_adapters_and_its_graph_keeps_one_byte_weights():
    cfg = ModelConfig(arch=tiny_arch(), init_std=0.2, lora=LORA, fp8=FP8Config(base="e4m3"))
    model = with_lora(build_transformer(cfg), cfg, seed=0)
    trainable = {n: p.clone() for n, p in model.named_parameters() if p.requires_grad}
    reference = {n: t.clone() for n, t in model.state_dict().items()}
    stored = store_base_in_float8(model, log=lambda line: None)
    assert len(stored) == 2 * 5
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trainable)
    # Checkpoints see the adapters as before and no float8 buffer; only the stored base weights are gone.
    assert set(reference) - set(model.state_dict()) == {f"{n}.base_layer.weight" for n in stored}
    layer = model.transformer_blocks[0].attn1.to_q
    assert isinstance(layer.base_layer, Float8StoredLinear)
    torch.nn.init.normal_(layer.lora_B["default"].weight)

    x = torch.randn(3, 10, 64, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = layer(x)
    big = [t for t in saved if t.numel() >= 64 * 64]
    assert big and all(t.dtype == torch.float8_e4m3fn for t in big)  # the upcast copy is not kept
    out.square().sum().backward()
    w = layer.base_layer.dequantized().detach()
    x2 = x.detach().clone().requires_grad_(True)
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    want = torch.nn.functional.linear(x2, w, layer.base_layer.bias) + (x2 @ a.T @ b.T) * layer.scaling["default"]
    want.square().sum().backward()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    assert layer.base_layer.bias.grad is None  # frozen


def test_the_planner_prices_the_float8_base_as_the_tiny_model_holds_it():
    overrides = ["model.lora.rank=4", "model.lora.extra_trainable=[proj_out]", "model.fp8.base=e4m3",
                 "run.output_dir=/unused", "data.latent_shards=/unused"]
    cfg = load_config("configs/tiny.yaml", overrides)
    model = with_lora(build_transformer(cfg.model), cfg.model)
    store_base_in_float8(model, log=lambda line: None)
    held = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    counts = ParamCounts.of(model)
    planned = state_bytes(counts, ZeroSettings(stage=2), "fp32", 1, model_dtype="fp32").weights
    assert planned == held
    plain = with_lora(build_transformer(cfg.model), cfg.model)
    unquantised = state_bytes(ParamCounts.of(plain), ZeroSettings(stage=2), "fp32", 1, model_dtype="fp32").weights
    # 4 attention projections of 64 x 64 in 2 blocks: 4 bytes a weight become 1, plus a 4-byte scale a row.
    assert unquantised - planned == 2 * 4 * (64 * 64 * 3 - 64 * 4)
    assert counts.stored_weights == 2 * 4 * 64 * 64


@pytest.mark.parametrize("overrides, message", [
    (["model.fp8.compute=tensorwise", "model.lora.rank=4", "model.lora.extra_trainable=[proj_out]"],
     "model.fp8.compute: is tensorwise, but model.lora"),
    (["model.fp8.compute=rowwise", "deepspeed.precision=fp16", "model.dtype=fp16"], "model.fp8.compute: is rowwise, with deepspeed.precision fp16"),
    (["model.fp8.compute=rowwise", "deepspeed.zero_stage=3"], "model.fp8.compute: is rowwise, with deepspeed.zero_stage 3"),
    (["model.fp8.base=e4m3"], "model.fp8.base: is e4m3, but model.lora.rank is 0"),
    (["model.fp8.base=e4m3", "model.lora.rank=4", "model.lora.extra_trainable=[proj_out]", "deepspeed.zero_stage=3"],
     "model.fp8.base: is e4m3, with deepspeed.zero_stage 3"),
    (["model.fp8.compute=float8"], "model.fp8.compute"),
])
def test_float8_settings_that_cannot_work_are_config_errors_naming_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config("configs/tiny.yaml", ["run.output_dir=/unused", "data.latent_shards=/unused", *overrides])


def test_float8_training_runs_and_a_resume_may_switch_it_off(shards, tmp_path):
    out = tmp_path / "run"
    common = ("train.micro_batch_size=2", "train.log_every=1", "checkpoint.every_steps=2", "deepspeed.precision=bf16",
              "model.dtype=bf16")
    r = train([sys.executable], out, shards, *common, "train.max_steps=2", "model.fp8.compute=rowwise")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "model.fp8.compute: rowwise on 12 linear layers (emulated: no float8 matmul on cpu)" in r.stdout + r.stderr
    r = train([sys.executable], out, shards, *common, "train.max_steps=3")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resuming with another float8 setting (model.fp8.compute: rowwise -> none)" in r.stdout + r.stderr
    with open(out / "metrics.jsonl") as f:
        records = {rec["step"]: rec for rec in map(json.loads, f)}
    assert sorted(records) == [1, 2, 3] and all(torch.isfinite(torch.tensor(r["loss"])) for r in records.values())


def test_a_lora_trained_on_the_float8_base_loads_in_diffusers_on_the_original_base(shards, tmp_path):
    from diffusers import CogVideoXImageToVideoPipeline
    from safetensors.torch import load_file

    from i2v.sample.export import export_pipeline

    out = tmp_path / "run"
    r = train([sys.executable], out, shards, "model.lora.rank=4", "model.lora.alpha=8",
              "model.lora.extra_trainable=[proj_out]", "model.fp8.base=e4m3", "train.micro_batch_size=2",
              "train.max_steps=2", "checkpoint.every_steps=2", "train.lr=1e-2")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "model.fp8.base: e4m3 for the frozen base of 8 layers" in r.stdout + r.stderr
    cfg = load_config(str(out / "config.yaml"))
    lora_dir = export_pipeline(cfg, str(out / "checkpoints"), str(tmp_path / "export"))
    trained = load_file(os.path.join(lora_dir, "pytorch_lora_weights.safetensors"))
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(lora_dir)
    pipe.load_lora_weights(lora_dir)
    to_q = pipe.transformer.transformer_blocks[1].attn1.to_q
    assert type(to_q.base_layer) is torch.nn.Linear and to_q.base_layer.weight.dtype == torch.float32
    b = trained["transformer.transformer_blocks.1.attn1.to_q.lora_B.weight"]
    assert b.abs().max() > 0  # trained: B starts at zero
    torch.testing.assert_close(to_q.lora_B["default_0"].weight, b)
    # The export's base is the original (the seeded init), not the float8 copy the adapters trained on.
    base = build_transformer(cfg.model, seed=cfg.run.seed)
    torch.testing.assert_close(to_q.base_layer.weight, base.transformer_blocks[1].attn1.to_q.weight)
