"""The fused modulation kernels (i2v/kernels/modulation.py) and the fused CogVideoX block (i2v/model/fused_block.py),
against diffusers' maths, under the interpreter."""

import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock
from torch._dynamo.utils import counters

from i2v.config import load_config
from i2v.core.errors import ConfigError
from i2v.kernels.modulation import (
    adaptive_norm,
    adaptive_norm_bwd,
    adaptive_norm_fwd,
    adaptive_norm_ref,
    gated_residual,
    gated_residual_bwd,
    gated_residual_fwd,
    gated_residual_ref,
    residual_norm,
    residual_norm_bwd,
    residual_norm_fwd,
    residual_norm_ref,
)
from i2v.model.attention import CogVideoXFlashAttnProcessor
from i2v.model.fused_block import apply_block_backend, fused_forward
from conftest import REPO

# Two samples, odd lengths (no multiple of a tile), C not a power of two: every mask matters.
B, TEXT, VIDEO, C, EPS = 2, 5, 37, 48, 1e-5
_OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_static")


def _rel(a, ref):
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _leaf(t, dtype):
    return t.to(dtype).detach().requires_grad_()


def _norm_inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, VIDEO, C, generator=g) * 2 + 0.5
    e = torch.randn(B, TEXT, C, generator=g) - 0.3
    weight = 1 + 0.3 * torch.randn(C, generator=g)
    bias = 0.2 * torch.randn(C, generator=g)
    mod = torch.randn(B, 4 * C, generator=g)  # shift, scale, enc_shift, enc_scale: chunks, as the block cuts them
    grad = torch.randn(B, TEXT + VIDEO, C, generator=g)
    return [_leaf(t, dtype) for t in (x, e, weight, bias, mod)] + [grad.to(dtype)]


def _norm_grads(fn, x, e, weight, bias, mod, grad):
    shift, scale, enc_shift, enc_scale = mod.chunk(4, dim=1)
    out = fn(x, e, weight, bias, EPS, shift, scale, enc_shift, enc_scale)
    return (out, *torch.autograd.grad(out, (x, e, weight, bias, mod), grad))


def _residual_inputs(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, VIDEO, C, generator=g)
    e = torch.randn(B, TEXT, C, generator=g)
    # The joint output of a layer, read through a non-contiguous view (as a Linear's output sliced would be).
    r = torch.randn(B, TEXT + VIDEO, 2 * C, generator=g)[..., :C]
    gates = torch.randn(B, 6 * C, generator=g)
    grads = torch.randn(B, VIDEO, C, generator=g), torch.randn(B, TEXT, C, generator=g)
    return [_leaf(t, dtype) for t in (x, e, r, gates)] + [g.to(dtype) for g in grads]


def _residual_grads(fn, x, e, r, gates, grad_x, grad_e):
    gate_x, gate_e = gates.chunk(6, dim=1)[2::3]  # gate and enc_gate, strided chunks of the linear's output
    out_x, out_e = fn(x, e, r, gate_x, gate_e)
    return (out_x, out_e, *torch.autograd.grad((out_x, out_e), (x, e, r, gates), (grad_x, grad_e)))


def _residual_norm_inputs(dtype=torch.float32, seed=0):
    x, e, weight, bias, mod, grad = _norm_inputs(dtype, seed)
    _, _, r, gates, grad_x, grad_e = _residual_inputs(dtype, seed + 10)
    return [x, e, r, gates, weight, bias, mod, grad_x, grad_e, grad]


def _residual_norm_grads(fn, x, e, r, gates, weight, bias, mod, grad_x, grad_e, grad):
    gate_x, gate_e = gates.chunk(6, dim=1)[2::3]
    shift, scale, enc_shift, enc_scale = mod.chunk(4, dim=1)
    outs = fn(x, e, r, gate_x, gate_e, weight, bias, EPS, shift, scale, enc_shift, enc_scale)
    return (*outs, *torch.autograd.grad(outs, (x, e, r, gates, weight, bias, mod), (grad_x, grad_e, grad)))


# op: (inputs, run forward and backward, names of the results, fused, reference, number of upstream gradients)
OPS = {
    "adaptive_norm": (_norm_inputs, _norm_grads, ("out", "dx", "de", "dweight", "dbias", "dmod"), adaptive_norm,
                      adaptive_norm_ref, 1),
    "gated_residual": (_residual_inputs, _residual_grads, ("out_x", "out_e", "dx", "de", "dr", "dgates"),
                       gated_residual, gated_residual_ref, 2),
    "residual_norm": (_residual_norm_inputs, _residual_norm_grads,
                      ("x1", "e1", "out", "dx", "de", "dr", "dgates", "dweight", "dbias", "dmod"), residual_norm,
                      residual_norm_ref, 3),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_fp32_outputs_and_gradients_match_the_reference(op):
    make, run, names, fused, ref_fn, _ = OPS[op]
    inputs = make()
    ours, ref = run(fused, *inputs), run(ref_fn, *inputs)
    assert len(ours) == len(ref) == len(names)
    for name, a, r in zip(names, ours, ref):
        assert a.dtype == r.dtype and a.shape == r.shape and a.is_contiguous()
        assert _rel(a, r) <= 1e-5, f"{op} {name}: relative error {_rel(a, r):.2e}"


@pytest.mark.parametrize("op", sorted(OPS))
def test_bf16_error_at_most_twice_eager(op):
    make, run, names, fused, ref_fn, n_grads = OPS[op]
    inputs = make(torch.bfloat16, seed=1)
    # The fp32 reference sees exactly the bf16 inputs, upcast.
    ref = run(ref_fn, *[_leaf(t, torch.float32) for t in inputs[:-n_grads]], *[t.float() for t in inputs[-n_grads:]])
    ours, eager = run(fused, *inputs), run(ref_fn, *inputs)
    for name, o, e, r in zip(names, ours, eager, ref):
        assert o.dtype == torch.bfloat16
        assert _rel(o, r) <= 2 * _rel(e, r) + 1e-6, f"{op} {name}: ours {_rel(o, r):.2e} vs eager {_rel(e, r):.2e}"


def test_ops_pass_opcheck():
    x, e, weight, bias, mod, grad = _norm_inputs()
    shift, scale, enc_shift, enc_scale = (t.detach() for t in mod.chunk(4, dim=1))
    torch.library.opcheck(adaptive_norm_fwd, (x, e, weight, bias, EPS, shift, scale, enc_shift, enc_scale),
                          test_utils=_OPCHECKS)
    _, mean, rstd = adaptive_norm_fwd(x, e, weight, bias, EPS, shift, scale, enc_shift, enc_scale)
    torch.library.opcheck(adaptive_norm_bwd, (grad, x.detach(), e.detach(), weight.detach(), bias.detach(), mean,
                                              rstd, scale, enc_scale), test_utils=_OPCHECKS)
    x, e, r, gates, grad_x, grad_e = _residual_inputs()
    gate_x, gate_e = gates.chunk(6, dim=1)[2::3]
    torch.library.opcheck(gated_residual_fwd, (x, e, r, gate_x, gate_e), test_utils=_OPCHECKS)
    torch.library.opcheck(gated_residual_bwd, (grad_x, grad_e, r.detach(), gate_x.detach(), gate_e.detach()),
                          test_utils=_OPCHECKS)
    x, e, r, gates, weight, bias, mod, grad_x, grad_e, grad = _residual_norm_inputs()
    gate_x, gate_e = gates.chunk(6, dim=1)[2::3]
    mods = [t.detach() for t in mod.chunk(4, dim=1)]
    args = (x, e, r, gate_x, gate_e, weight, bias, EPS, *mods)
    torch.library.opcheck(residual_norm_fwd, args, test_utils=_OPCHECKS)
    x1, e1, _, mean, rstd = residual_norm_fwd(*args)
    plain = [t.detach() for t in (x1, e1, r, gate_x, gate_e, weight, bias)]
    torch.library.opcheck(residual_norm_bwd, (grad, grad_x, grad_e, *plain, mean, rstd, mods[1], mods[3]),
                          test_utils=_OPCHECKS)


def test_fakes_give_the_shapes_on_meta():
    x, e = torch.empty(B, VIDEO, C, device="meta"), torch.empty(B, TEXT, C, device="meta")
    vec, w = torch.empty(B, C, device="meta"), torch.empty(C, device="meta")
    out, mean, rstd = adaptive_norm_fwd(x, e, w, w, EPS, vec, vec, vec, vec)
    assert out.shape == (B, TEXT + VIDEO, C) and mean.shape == rstd.shape == (B * (TEXT + VIDEO),)
    dx, de, dwb, dmod = adaptive_norm_bwd(out, x, e, w, w, mean, rstd, vec, vec)
    assert (dx.shape, de.shape, dwb.shape, dmod.shape) == (x.shape, e.shape, (2, C), (2, B, 2, C))
    out_x, out_e = gated_residual_fwd(x, e, out, vec, vec)
    assert (out_x.shape, out_e.shape) == (x.shape, e.shape)
    dr, dgates = gated_residual_bwd(out_x, out_e, out, vec, vec)
    assert (dr.shape, dgates.shape) == (out.shape, (2, B, C))
    x1, e1, out, mean, rstd = residual_norm_fwd(x, e, out, vec, vec, w, w, EPS, vec, vec, vec, vec)
    assert (x1.shape, e1.shape, out.shape, mean.shape) == (x.shape, e.shape, (B, TEXT + VIDEO, C), (B * (TEXT + VIDEO),))
    grads = residual_norm_bwd(out, x1, e1, x1, e1, out, vec, vec, w, w, mean, rstd, vec, vec)
    assert [g.shape for g in grads] == [x.shape, e.shape, out.shape, (2, C), (2, B, 2, C), (2, B, C)]


def test_bad_inputs_are_named():
    x, e, weight, bias, mod, _ = _norm_inputs()
    shift, scale, enc_shift, enc_scale = mod.chunk(4, dim=1)
    with pytest.raises(ValueError, match=r"adaptive_norm: needs the LayerNorm's weight and bias"):
        adaptive_norm(x, e, None, None, EPS, shift, scale, enc_shift, enc_scale)
    with pytest.raises(ValueError, match=r"adaptive_norm: scale_e must be \[B, C\]"):
        adaptive_norm(x, e, weight, bias, EPS, shift, scale, enc_shift, enc_scale[:1])
    with pytest.raises(ValueError, match=r"gated_residual: r must be \[B, St \+ Sv, C\]"):
        gated_residual(x, e, x, shift, scale)
    with pytest.raises(ValueError, match=r"residual_norm: r must be \[B, St \+ Sv, C\]"):
        residual_norm(x, e, x, shift, scale, weight, bias, EPS, shift, scale, enc_shift, enc_scale)


# The interpreter accepts programs a GPU compiler refuses: compile the real kernels for an H100/H200 (sm_90) ahead
# of time, at the 5B width (C = 3072: BLOCK_C 4096, one row per program, 8 warps), and the partial sums'
# reduction. Needs triton's bundled ptxas, not a GPU; a child process, because TRITON_INTERPRET decides at import
# how the kernels are defined.
_COMPILE_FOR_SM90 = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from i2v.kernels import modulation as m

    FP32 = {"MEAN", "RSTD", "MOD_PART", "WB_PART", "GATE_PART", "PART"}
    INTS = {"S", "C", "P"}
    kernels = [(m._adaptive_norm_fwd, dict(RESIDUAL=False)), (m._adaptive_norm_fwd, dict(RESIDUAL=True)),
               (m._adaptive_norm_bwd, dict(RESIDUAL=False)), (m._adaptive_norm_bwd, dict(RESIDUAL=True)),
               (m._gated_residual_fwd, {}), (m._gated_residual_bwd, {})]
    for kernel, flags in kernels:
        for ty in ("bf16", "fp32"):
            const = dict(BLOCK_R=1, BLOCK_C=4096, RNE_BF16=False, **flags)
            sig = {}
            for name in kernel.arg_names:
                if name in const:
                    sig[name] = "constexpr"
                elif (name.isupper() or name == "Bias") and name not in INTS:
                    sig[name] = "*fp32" if name in FP32 else f"*{ty}"
                else:
                    sig[name] = "fp32" if name == "eps" else "i32"
            ptrs = [i for i, n in enumerate(kernel.arg_names) if sig[n].startswith("*")]
            aligned = {(i,): [["tt.divisibility", 16]] for i in ptrs}  # as a real launch sees the pointers
            compiled = triton.compile(ASTSource(kernel, sig, const, aligned), target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": 8})
            assert compiled.asm["cubin"], (kernel.fn.__name__, ty)
        sig = dict(PART="*fp32", OUT=f"*{ty}", R="i32", N="i32", BLOCK_N="constexpr", RNE_BF16="constexpr")
        const = dict(BLOCK_N=1024, RNE_BF16=False)
        compiled = triton.compile(ASTSource(m._sum_partials, sig, const, {(0,): [["tt.divisibility", 16]]}),
                                  target=GPUTarget("cuda", 90, 32))
        assert compiled.asm["cubin"], ty
    print("compiled")
    """
)


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _COMPILE_FOR_SM90], env=env, capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0 and "compiled" in proc.stdout, proc.stderr[-3000:]


# ----------------------------------------------------------------------------- the whole block


def _block(processor):
    torch.manual_seed(0)
    block = CogVideoXBlock(dim=C, num_attention_heads=3, attention_head_dim=16, time_embed_dim=24)
    with torch.no_grad():  # diffusers initialises LayerNorm to (1, 0): move them so their gradients are tested
        for p in block.parameters():
            p.add_(0.05 * torch.randn_like(p))
    block.attn1.set_processor(processor)
    return block


def _block_inputs():
    g = torch.Generator().manual_seed(3)
    angles = torch.randn(VIDEO, 16, generator=g)
    return (torch.randn(B, VIDEO, C, generator=g), torch.randn(B, TEXT, C, generator=g),
            torch.randn(B, 24, generator=g), (angles.cos(), angles.sin()))


def _run_block(block, fn, video, text, temb, rotary):
    leaves = [t.clone().requires_grad_() for t in (video, text, temb)]
    block.zero_grad(set_to_none=True)
    out_video, out_text = fn(*leaves, rotary, None)
    (out_video.square().sum() + 0.5 * out_text.square().sum()).backward()
    return [out_video, out_text] + [t.grad for t in leaves] + [p.grad for p in block.parameters()]


@pytest.mark.parametrize("processor", ["ours", "diffusers"])
def test_fused_block_matches_diffusers_forward_and_gradients(processor):
    """With our processor the block calls its joint entry; with diffusers' it calls attn1 on views."""
    block = _block(CogVideoXFlashAttnProcessor("torch") if processor == "ours" else CogVideoXAttnProcessor2_0())
    inputs = _block_inputs()
    ref = _run_block(block, lambda *a: CogVideoXBlock.forward(block, *a), *inputs)
    ours = _run_block(block, types.MethodType(fused_forward, block), *inputs)
    names = ["video", "text", "d video", "d text", "d temb"] + [n for n, _ in block.named_parameters()]
    assert all(g is not None for g in ours)
    for name, a, r in zip(names, ours, ref):
        assert _rel(a, r) <= 1e-5, f"{name}: relative error {_rel(a, r):.2e}"


def test_fused_block_runs_diffusers_forward_under_autocast():
    block = _block(CogVideoXFlashAttnProcessor("torch"))
    video, text, temb, rotary = _block_inputs()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = fused_forward(block, video, text, temb, rotary)
        ref = CogVideoXBlock.forward(block, video, text, temb, rotary)
    for a, r in zip(ours, ref):
        assert a.dtype == r.dtype and torch.equal(a, r)


def test_fused_block_compiles_fullgraph_forward_and_backward():
    block = _block(CogVideoXFlashAttnProcessor("torch"))
    inputs = _block_inputs()
    assert apply_block_backend(types.SimpleNamespace(transformer_blocks=[block], parameters=block.parameters),
                               "triton") == "triton"
    eager = _run_block(block, block, *inputs)
    torch._dynamo.reset()
    counters.clear()
    compiled = _run_block(block, torch.compile(block, fullgraph=True, dynamic=False, backend="aot_eager"), *inputs)
    assert not counters["graph_break"]
    for a, r in zip(compiled, eager):
        assert _rel(a, r) <= 1e-5


def test_block_backend_choice_and_config_key():
    block = _block(CogVideoXFlashAttnProcessor("torch"))
    model = types.SimpleNamespace(transformer_blocks=[block], parameters=block.parameters)
    assert apply_block_backend(model, "auto") == "torch" and "forward" not in vars(block)  # CPU: diffusers' block
    assert apply_block_backend(model, "auto", device="cuda") == "triton"
    assert vars(block)["forward"].__func__ is fused_forward
    assert apply_block_backend(model, "auto", device="cuda", zero_stage=3) == "torch"
    assert "forward" not in vars(block)  # removed again: diffusers' class forward
    with pytest.raises(ValueError, match=r"kernels\.block must be one of"):
        apply_block_backend(model, "fast")
    tiny = REPO / "configs" / "tiny.yaml"
    assert load_config(tiny).kernels.block == "auto"
    with pytest.raises(ConfigError, match=r"kernels\.block"):
        load_config(tiny, ["kernels.block=fast"])
    with pytest.raises(ConfigError, match=r"kernels\.block: `triton` does not work with deepspeed\.zero_stage 3"):
        load_config(tiny, ["kernels.block=triton", "deepspeed.zero_stage=3"])


def test_fused_blocks_train_like_diffusers_under_selective_checkpointing_and_lora(checkpointing="selective",
                                                                                  lora_rank=4):
    """A two-block DiT: fused blocks under selective gradient checkpointing (the fused ops are recomputed, the
    QKV projections and the attention core kept) and LoRA give diffusers' plain blocks' loss and gradients."""
    import dataclasses

    from i2v.model.adapters import with_lora
    from i2v.model.checkpointing import apply_checkpointing
    from i2v.model.transformer import build_transformer, predict, rotary_embeddings

    cfg = load_config(REPO / "configs" / "tiny.yaml").model
    cfg = dataclasses.replace(cfg, lora=dataclasses.replace(cfg.lora, rank=lora_rank,
                                                            extra_trainable=["proj_out"] if lora_rank else []))
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 2, cfg.arch["in_channels"], 8, 8, generator=g)
    prompt = torch.randn(2, cfg.arch["max_text_seq_length"], cfg.arch["text_embed_dim"], generator=g)

    def train_step(block, setting):
        model = with_lora(build_transformer(cfg, seed=0), cfg, seed=0)
        # The init zeroes the output layer: every other gradient would be 0.
        torch.nn.init.normal_(model.proj_out.weight, std=0.1, generator=torch.Generator().manual_seed(1))
        for module in model.modules():
            if hasattr(module, "set_processor"):
                module.set_processor(CogVideoXFlashAttnProcessor("torch"))
        assert apply_block_backend(model, block) == block
        apply_checkpointing(model, setting)
        rotary = rotary_embeddings(model.config, 2, 8, 8, "cpu")
        loss = predict(model, latents, prompt, torch.tensor([10, 700]), rotary=rotary).square().mean()
        loss.backward()
        return [loss.detach()] + [p.grad for p in model.parameters() if p.requires_grad]

    ours, ref = train_step("triton", checkpointing), train_step("torch", "none")
    assert len(ours) == len(ref) > 1
    nonzero = [r.abs().max() > 0 for r in ref]
    assert sum(nonzero) > len(ref) // 2  # LoRA's A matrices get none at the first step (B starts at zero)
    for a, r, live in zip(ours, ref, nonzero):
        assert _rel(a, r) <= 1e-5 if live else not a.any()
