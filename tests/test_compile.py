"""model.compile: blocks (i2v.model.compile): graph-break-free blocks, one graph for every block, the same
training run as eager, checkpoints that move between the settings, and the configurations it refuses.

The in-process tests trace with torch.compile's "aot_eager" backend: dynamo (where graph breaks and
recompiles happen) and AOTAutograd (the forward and backward graphs, the custom attention ops' fake
implementations) as inductor sees them, without inductor's C++ code generation, which costs about 40 s a
graph on this CPU. The training run compiles with inductor, the backend `model.compile` uses.
"""

import dataclasses
import sys

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from conftest import REPO
from i2v.config import load_config
from i2v.core.errors import ConfigError
from i2v.model.adapters import with_lora
from i2v.model.compile import apply_compile
from i2v.model.transformer import build_transformer, predict, rotary_embeddings, set_attention
from processor_models import block_outputs_and_grads
from runs import losses, train

TINY = REPO / "configs" / "tiny.yaml"
CFG = load_config(TINY)
FRAMES, HEIGHT, WIDTH = 3, 16, 16  # latent frames and size: 3 x 8 x 8 = 192 video tokens


def tiny_model(attention="torch", checkpointing="none", lora_rank=0):
    lora = dataclasses.replace(CFG.model.lora, rank=lora_rank, extra_trainable=["proj_out"] if lora_rank else [])
    cfg = dataclasses.replace(CFG.model, gradient_checkpointing=checkpointing, lora=lora)
    model = with_lora(build_transformer(cfg, seed=0), cfg, seed=0)
    set_attention(model, attention)
    return model


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    c = CFG.model.arch
    latents = torch.randn(2, FRAMES, c["in_channels"], HEIGHT, WIDTH, generator=g)
    prompt = torch.randn(2, c["max_text_seq_length"], c["text_embed_dim"], generator=g)
    return latents, prompt, torch.tensor([10, 700])


def relative_error(ours, ref) -> float:
    return ((ours - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


@pytest.mark.parametrize("attention", ["torch", "triton"])
def test_block_compiles_fullgraph_forward_and_backward(attention):
    """A CogVideoX block with our attention processor is one graph (fullgraph=True raises at a graph
    break) in forward and backward, and gives eager's outputs and gradients."""
    model = tiny_model(attention)
    block = model.transformer_blocks[0]
    c = model.config
    g = torch.Generator().manual_seed(1)
    width = c.num_attention_heads * c.attention_head_dim
    video = torch.randn(2, FRAMES * (HEIGHT // 2) * (WIDTH // 2), width, generator=g)
    text = torch.randn(2, c.max_text_seq_length, width, generator=g)
    temb = torch.randn(2, c.time_embed_dim, generator=g)
    rotary = rotary_embeddings(c, FRAMES, HEIGHT, WIDTH, "cpu")

    def run(fn):
        return block_outputs_and_grads(block, fn, video, text, temb, rotary)

    eager = run(block)
    torch._dynamo.reset()
    counters.clear()
    compiled = run(torch.compile(block, fullgraph=True, dynamic=False, backend="aot_eager"))
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == 1
    assert len(eager) == len(compiled) == 5 + len(list(block.parameters()))
    for ours, ref in zip(compiled, eager):
        assert relative_error(ours.detach(), ref.detach()) <= 1e-5


def train_step(model):
    latents, prompt, t = inputs()
    model.zero_grad(set_to_none=True)
    rotary = rotary_embeddings(model.config, FRAMES, HEIGHT, WIDTH, "cpu")
    loss = (predict(model, latents, prompt, t, rotary=rotary) - 1).square().mean()
    loss.backward()
    return [loss.detach()] + [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("checkpointing, lora_rank, graphs", [
    ("none", 0, 1),
    ("selective", 0, 1),
    (1, 4, 2),  # the first block's input needs no gradient under LoRA, the second's does: one recompile
])
def test_blocks_share_one_graph_and_keep_state_dict_keys(checkpointing, lora_rank, graphs):
    """`model.compile: blocks` compiles each block in place: the blocks share the compiled code (no
    graph per block), composed with activation checkpointing and LoRA the model trains as eager does,
    and the state_dict is eager's key for key, loadable both ways."""
    eager = tiny_model("torch", checkpointing, lora_rank)
    compiled = tiny_model("torch", checkpointing, lora_rank)
    torch._dynamo.reset()
    counters.clear()
    assert apply_compile(compiled, "blocks", backend="aot_eager") == len(compiled.transformer_blocks) == 2
    forwards = [b.forward for b in compiled.transformer_blocks]
    apply_compile(compiled, "blocks", backend="aot_eager")  # once is enough: nothing compiles twice
    assert [b.forward for b in compiled.transformer_blocks] == forwards
    assert all(len(b._forward_pre_hooks) == 1 for b in compiled.transformer_blocks)
    ref = train_step(eager)
    for _ in range(2):  # the second step reuses what the first compiled
        ours = train_step(compiled)
    assert not counters["graph_break"]
    assert counters["stats"]["unique_graphs"] == graphs
    assert len(ours) == len(ref) > 1
    for a, b in zip(ours, ref):
        assert relative_error(a, b) <= 1e-5

    assert list(compiled.state_dict()) == list(eager.state_dict())
    compiled.load_state_dict(eager.state_dict(), strict=True)
    eager.load_state_dict(compiled.state_dict(), strict=True)


def test_compile_none_changes_nothing():
    model = tiny_model()
    forwards = [b.forward for b in model.transformer_blocks]
    assert apply_compile(model, "none") == 0
    assert [b.forward for b in model.transformer_blocks] == forwards
    assert all(not b._forward_pre_hooks for b in model.transformer_blocks)
    with pytest.raises(ValueError, match="model.compile"):
        apply_compile(model, "all")


STEPS = ["train.log_every=1", "checkpoint.every_steps=0"]


def test_training_run_with_compiled_blocks_matches_eager(shards, tmp_path):
    """Three steps of the tiny run (ZeRO-2, fp32) with `model.compile=blocks` give eager's losses, and the
    checkpoint they commit resumes with compile off to eager's fourth step. The graphs are traced as inductor
    sees them but run by `aot_eager`: inductor's C++ code generation costs about 40 s a graph on a CPU (the
    inductor path runs in `bash bench/gpu.sh --cpu-smoke`, bench/train_step.py's i2v-compile variant)."""
    eager = train([sys.executable], tmp_path / "eager", shards, "train.max_steps=4", *STEPS)
    assert eager.returncode == 0, eager.stdout[-3000:] + eager.stderr[-3000:]
    run = tmp_path / "compiled"
    compiled = train([sys.executable], run, shards, "train.max_steps=3", "model.compile=blocks",
                     "model.compile_backend=aot_eager", *STEPS)
    assert compiled.returncode == 0, compiled.stdout[-3000:] + compiled.stderr[-3000:]
    ref, _ = losses(tmp_path / "eager")
    ours, _ = losses(run)
    assert len(ref) == 4 and len(ours) == 3
    for a, b in zip(ours, ref):
        assert abs(a - b) <= 1e-5 * abs(b)

    resumed = train([sys.executable], run, shards, "train.max_steps=4", *STEPS)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert any(line.startswith("[i2v] resumed from") and ": step 3," in line for line in resumed.stdout.splitlines())
    after, _ = losses(run)
    assert len(after) == 4
    assert abs(after[3] - ref[3]) <= 1e-5 * abs(ref[3])


def test_compile_blocks_at_zero3_is_a_config_error():
    """ZeRO-3 gathers a block's parameters in module hooks that would run inside the compiled block."""
    with pytest.raises(ConfigError, match=r"model\.compile.*deepspeed\.zero_stage 3"):
        load_config(TINY, ["model.compile=blocks", "deepspeed.zero_stage=3"])
    for stage in (0, 1, 2):
        assert load_config(TINY, ["model.compile=blocks", f"deepspeed.zero_stage={stage}"]).model.compile == "blocks"
    assert load_config(TINY, ["deepspeed.zero_stage=3"]).model.compile == "none"


def test_bad_compile_value_is_a_config_error():
    with pytest.raises(ConfigError, match=r"model\.compile: got 'block'.*did you mean 'blocks'"):
        load_config(TINY, ["model.compile=block"])
