"""Activation checkpointing (`model.gradient_checkpointing`): every setting trains the same numbers, keeps the
bytes the memory model says, and `auto` picks what the planner prices."""

import gc

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from conftest import REPO
from i2v.config import load_config
from i2v.core.errors import ConfigError
from i2v.model.attention import CogVideoXFlashAttnProcessor, apply_attention_backend
from i2v.model.checkpointing import CORE_OPS, apply_checkpointing
from i2v.model.transformer import rotary_embeddings
from i2v.plan.memory import activation_bytes
from i2v.plan.planner import GiB, make_plan, resolve_checkpointing
from runs import tiny_arch


def random_model(arch: dict) -> CogVideoXTransformer3DModel:
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(**arch)
    with torch.no_grad():  # the default init zeroes some projections: random weights make every path count
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def inputs(model, frames, height, width):
    c = model.config
    gen = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, frames, c.in_channels, height, width, generator=gen),
                encoder_hidden_states=torch.randn(1, c.max_text_seq_length, c.text_embed_dim, generator=gen),
                timestep=torch.tensor([500]), image_rotary_emb=rotary_embeddings(c, frames, height, width, "cpu"),
                return_dict=False)


class CoreCalls(TorchDispatchMode):
    """Counts the attention cores' forward ops (what selective checkpointing must not run again)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func.name() in CORE_OPS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["torch", "ours-torch", "triton", "torch-zero3-linear"])
def test_every_setting_gives_the_loss_and_gradients_of_all(backend, monkeypatch):
    """diffusers' processor (kernels.attention: torch) and ours on SDPA and on the Triton kernel; and under
    DeepSpeed ZeRO-3's replacement of F.linear, which adds the bias in place."""
    if backend == "torch-zero3-linear":
        from deepspeed.runtime.zero.linear import zero3_linear_wrap

        monkeypatch.setattr(torch.nn.functional, "linear", zero3_linear_wrap)
    model = random_model(tiny_arch())
    apply_attention_backend(model, "triton" if backend == "triton" else "torch")
    if backend == "ours-torch":
        for block in model.transformer_blocks:
            block.attn1.set_processor(CogVideoXFlashAttnProcessor("torch"))
    batch = inputs(model, 3, 8, 8)
    keys = list(model.state_dict())
    results = {}
    for setting in ("all", "none", 1, "selective"):
        apply_checkpointing(model, setting)
        assert list(model.state_dict()) == keys
        model.zero_grad(set_to_none=True)
        loss = model(**batch)[0].square().mean()
        with CoreCalls() as recompute:
            loss.backward()
        results[setting] = loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}
        # Backward reruns the attention core of the fully checkpointed blocks only (2 under all, 1 under 1).
        assert recompute.calls == {"all": 2, "none": 0, 1: 1, "selective": 0}[setting], setting
    ref_loss, ref_grads = results["all"]
    for setting, (loss, grads) in results.items():
        assert loss == pytest.approx(ref_loss, rel=1e-6), setting
        for name, grad in grads.items():
            err = (grad - ref_grads[name]).abs().max().item()
            assert err <= 1e-6 * ref_grads[name].abs().max().item(), f"{setting}: {name} differs by {err:.3e}"


class LiveStorages(TorchDispatchMode):
    """Records, per transformer block, the storages its forward's ops create (parameters excluded)."""

    def __init__(self, model):
        super().__init__()
        self.block = None
        self.made = {}  # data_ptr -> (block, weak ref, bytes); an address freed and reused is recorded anew
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.block is not None:
            for t in tree_flatten(out)[0]:
                if isinstance(t, torch.Tensor):
                    s = t.untyped_storage()
                    old = self.made.get(s.data_ptr())
                    if s.data_ptr() not in self.params and (old is None or old[1].expired()):
                        self.made[s.data_ptr()] = (self.block, StorageWeakRef(s), s.nbytes())
        return out

    def alive(self, layers: int) -> list[int]:
        """Bytes that each block's forward left alive: what backward will read (or recompute from)."""
        gc.collect()
        per = [0] * layers
        for block, ref, nbytes in self.made.values():
            if not ref.expired():
                per[block] += nbytes
        return per


def kept_bytes_per_block(model, setting, frames, height, width) -> list[int]:
    apply_checkpointing(model, setting)
    track = LiveStorages(model)
    hooks = []
    for i, block in enumerate(model.transformer_blocks):
        hooks.append(block.register_forward_pre_hook(lambda m, a, i=i: setattr(track, "block", i)))
        hooks.append(block.register_forward_hook(lambda m, a, o: setattr(track, "block", None)))
    with track:
        out = model(**inputs(model, frames, height, width))[0]
    for h in hooks:
        h.remove()
    per = track.alive(len(model.transformer_blocks))
    del out
    return per


# Wide enough that the per-token vectors dominate (768 video tokens, d = 64); three blocks.
MEASURED = dict(num_attention_heads=4, attention_head_dim=16, in_channels=8, out_channels=4, time_embed_dim=16,
                text_embed_dim=16, num_layers=3, sample_frames=9, sample_height=32, sample_width=32, patch_size=2,
                max_text_seq_length=8, use_rotary_positional_embeddings=True)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bytes_each_block_keeps_match_the_memory_model(backend):
    """What a block's forward leaves alive for backward, per setting, against `activation_bytes`.

    torch's saved-tensor hooks cannot see this under checkpointing (the checkpoint's own hooks replace
    them inside, and selective checkpointing keeps its outputs in a cache of its own), so every storage
    the block's ops create is watched by weak reference, and what outlives the forward is counted. The
    blocks after the first are compared: the first also makes storages of the embedding's that the
    model counts outside the blocks.
    """
    model = random_model(MEASURED)
    apply_attention_backend(model, backend)
    # The Triton interpreter pays per tile: a quarter of the tokens there (200, still mostly per-block bytes).
    frames, height, width = (3, 32, 32) if backend == "torch" else (3, 16, 16)
    model_bytes = activation_bytes(model.config, frames, height, width, micro_batch=1, dtype_bytes=4,
                                   attention=backend).kept_per_block
    for setting in ("none", "selective", "all"):
        measured = kept_bytes_per_block(model, setting, frames, height, width)[1:]
        for got in measured:
            want = model_bytes[setting]
            assert abs(got - want) <= 0.15 * want, f"{setting}: measured {got:,} B in a block, modelled {want:,}"
    assert model_bytes["all"] < model_bytes["selective"] < model_bytes["none"] / 4


def test_config_values_and_errors():
    for given, stored in (("true", True), ("false", False), ("all", "all"), ("none", "none"), ("3", 3),
                          ("selective", "selective"), ("auto", "auto")):
        cfg = load_config(REPO / "configs" / "tiny.yaml", [f"model.gradient_checkpointing={given}"])
        assert cfg.model.gradient_checkpointing == stored  # validation changes nothing
    for bad in ("sometimes", "-1", "0.5"):
        with pytest.raises(ConfigError, match=r"model\.gradient_checkpointing: .*selective"):
            load_config(REPO / "configs" / "tiny.yaml", [f"model.gradient_checkpointing={bad}"])
    with pytest.raises(ConfigError, match=r"model\.memory_headroom_gb"):
        load_config(REPO / "configs" / "tiny.yaml", ["model.memory_headroom_gb=-1"])


def test_auto_picks_the_least_recompute_that_fits():
    cfg = load_config(REPO / "configs" / "cogvideox-5b-i2v.yaml")
    assert cfg.model.gradient_checkpointing == "auto"
    plan = make_plan(cfg, 8, 80)
    # 80 GiB: the whole activations (94 GiB) do not fit; selective recomputes less than any N blocks that fit.
    assert plan.checkpointing == "selective" and plan.fits
    assert plan.recompute["selective"] < min(plan.recompute[n] for n in range(1, 42) if plan.peak_at(n) <= plan.usable_bytes)
    assert resolve_checkpointing(cfg, 141 * GiB, 8)[0] == "none"
    setting, peak, reason = resolve_checkpointing(cfg, 40 * GiB, 8)
    assert isinstance(setting, int) and 0 < setting < 42 and peak <= 36 * GiB and "fits" in reason
    assert resolve_checkpointing(cfg, 10 * GiB, 8)[0] == "all"  # nothing fits: the least memory
    tight = load_config(REPO / "configs" / "cogvideox-5b-i2v.yaml", ["model.memory_headroom_gb=40"])
    assert make_plan(tight, 8, 80).checkpointing not in ("none", "selective")
    assert make_plan(load_config(REPO / "configs" / "tiny.yaml", ["model.gradient_checkpointing=true"]), 1, 4).checkpointing == "all"


def test_training_start_resolves_auto_on_this_machine():
    """What launcher/train.py hands the trainer: on a CPU, auto is judged against the host's memory."""
    from i2v.plan.planner import checkpointing_at_start

    assert checkpointing_at_start(load_config(REPO / "configs" / "tiny.yaml"), 1) == (None, None)  # a named setting
    setting, line = checkpointing_at_start(load_config(REPO / "configs" / "tiny.yaml", ["model.gradient_checkpointing=auto"]), 1)
    assert setting == "none"  # the tiny model fits anywhere
    assert line.startswith("gradient checkpointing: auto -> none (predicted peak ") and "host memory" in line


def test_recompute_flops_are_what_torch_counts_again():
    """FlopCounterMode (which does not count the CPU flash-attention op, so the cores cancel out) sees the
    recompute as the difference from a run without checkpointing; the cost model's `recompute` predicts it."""
    from torch.utils.flop_counter import FlopCounterMode

    from i2v.model.flops import training_flops

    model = random_model(MEASURED)
    batch = inputs(model, 3, 16, 16)
    counted = {}
    for setting in ("none", 1, "selective", "all"):
        apply_checkpointing(model, setting)
        with FlopCounterMode(display=False) as counter:
            model(**batch)[0].square().mean().backward()
        counted[setting] = counter.get_total_flops()
    for setting in (1, "selective", "all"):
        want = training_flops(model.config, 3, 16, 16, gradient_checkpointing=setting).recompute
        if setting != "selective":  # a full block's recompute reruns its core too, which the counter misses here
            tokens, d = 8 + 3 * 8 * 8, 64
            want -= (1 if setting == 1 else 3) * 4 * tokens**2 * d
        got = counted[setting] - counted["none"]
        assert abs(got - want) <= 0.03 * want, f"{setting}: recompute counted {got:,}, modelled {want:,}"


def test_lora_with_dropout_trains_the_same_under_every_setting():
    """As the trainer builds it: checkpointing applied to the base, then LoRA adapters (with dropout, whose
    masks the recompute must draw again identically) wrapped around the projections."""
    from i2v.config.schema import LoRAConfig, ModelConfig
    from i2v.model.adapters import with_lora

    lora = ModelConfig(arch=tiny_arch(), lora=LoRAConfig(rank=4, dropout=0.2, init="gaussian",
                                                         target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                                         extra_trainable=["proj_out"]))
    results = {}
    for setting in ("all", "none", 1, "selective"):
        model = random_model(tiny_arch())
        apply_checkpointing(model, setting)
        model = with_lora(model, lora, seed=3)
        with torch.no_grad():  # B starts at zero: make the adapters' path count in the loss too
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
        torch.manual_seed(5)
        loss = model(**inputs(model, 3, 8, 8))[0].square().mean()
        loss.backward()
        results[setting] = loss.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    torch.manual_seed(6)  # other dropout masks, another loss: the masks are in play
    with torch.no_grad():
        assert model(**inputs(model, 3, 8, 8))[0].square().mean().item() != pytest.approx(results["selective"][0])
    ref_loss, ref_grads = results["all"]
    assert any("lora_A" in n for n in ref_grads)
    for setting, (loss, grads) in results.items():
        assert loss == pytest.approx(ref_loss, rel=1e-6), setting
        for name, grad in grads.items():
            err = (grad - ref_grads[name]).abs().max().item()
            assert err <= 1e-6 * ref_grads[name].abs().max().item(), f"{setting}: {name} differs by {err:.3e}"


def test_selective_refuses_a_block_without_qk_norm():
    model = random_model(tiny_arch())
    model.transformer_blocks[1].attn1.norm_k = None
    apply_checkpointing(model, "all")  # full recompute has nothing kept to overwrite
    with pytest.raises(ValueError, match="'selective' needs the QK norm"):
        apply_checkpointing(model, "selective")
