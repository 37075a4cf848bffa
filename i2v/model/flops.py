"""Training FLOPs per sample of a CogVideoXTransformer3DModel: the one cost model.

Telemetry (MFU, HFU), the planner and the benchmarks all call `training_flops`; nothing else
counts FLOPs.

What is counted (the usual MFU convention):
- a linear layer over T tokens with a [in, out] weight costs 2·T·in·out forward; backward costs
  the same again for the weight gradient and again for the input gradient, except where the
  input is data (the patch and text embeddings, the first layer of the timestep MLPs), whose
  gradient nobody asks for. Over the per-token weights N and S tokens this is the familiar 6·N·S.
- attention over the joint text + video sequence of S tokens costs 4·S²·d forward (QK^T and PV,
  d = heads x head_dim) and twice that backward: 12·L·S²·d in all. A flash kernel's recompute
  of the scores in its backward is an implementation's extra work, not counted.
- the adaptive norms' and the timestep embedding's linears act once per sample, not per token.
- elementwise work (norms, softmax, GELU, RoPE) is not counted.
Gradient checkpointing reruns forward work during backward; that work is `recompute`, outside the
model FLOPs, so MFU uses `model` and HFU uses `hardware`. By setting (`i2v.model.checkpointing`):
"all" reruns every block's forward, an int N the first N blocks' forwards, "selective" every block's
forward except the Q/K/V projections and the attention core (what it keeps), "none" nothing.

Reference: CogVideoX-5b-I2V at 13x60x90 latents (49x480x720 clips) has 226 + 17,550 = 17,776
tokens per sample and about 0.997 PFLOP of model FLOPs per sample.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class SampleFlops:
    forward: int
    backward: int
    recompute: int  # gradient-checkpointing reruns of forward work in backward (0 without it)
    text_tokens: int
    video_tokens: int

    @property
    def model(self) -> int:
        """Forward + backward: the numerator of MFU."""
        return self.forward + self.backward

    @property
    def hardware(self) -> int:
        """Model FLOPs plus the recompute: the numerator of HFU."""
        return self.model + self.recompute

    @property
    def tokens(self) -> int:
        return self.text_tokens + self.video_tokens


def video_tokens(config: Mapping, frames: int, height: int, width: int) -> int:
    """Video tokens of latents of [frames, height, width]: the DiT's patch grid.

    A 1.5-style model (`patch_size_t`) sees its latent frames padded up to a multiple of it, as the
    trainer does; so this counts a padded clip and its unpadded original alike.
    """
    p, pt = config["patch_size"], config.get("patch_size_t") or 1
    return -(-frames // pt) * (height // p) * (width // p)


def training_flops(config: Mapping, frames: int, height: int, width: int, text_tokens: int | None = None,
                   gradient_checkpointing="none") -> SampleFlops:
    """FLOPs of one training sample with latents of [frames, height, width].

    `config` is the model's full config (`model.config`, or a dict of every constructor
    argument); `text_tokens` defaults to its `max_text_seq_length` (prompts are padded to it).
    A 1.5-style model (`patch_size_t`) sees its latent frames padded up to a multiple of it,
    as the trainer does. `gradient_checkpointing` is a resolved setting ("none", "all", "selective",
    an int N; True/False mean "all"/"none").
    """
    from i2v.model.checkpointing import block_counts

    c = dict(config)
    d = c["num_attention_heads"] * c["attention_head_dim"]
    p, pt = c["patch_size"], c.get("patch_size_t")
    text = c["max_text_seq_length"] if text_tokens is None else text_tokens
    video = video_tokens(c, frames, height, width)
    seq = text + video
    ff = 4 * d  # diffusers' CogVideoXBlock builds its FeedForward with the default 4x width
    temb = c["time_embed_dim"]

    def linear(tokens: int, n_in: int, n_out: int, input_grad: bool = True) -> tuple[int, int]:
        fwd = 2 * tokens * n_in * n_out
        return fwd, fwd * (2 if input_grad else 1)

    block = [
        *[linear(seq, d, d) for _ in range(4)],  # to_q, to_k, to_v, to_out over text + video
        linear(seq, d, ff), linear(seq, ff, d),  # the feed-forward, also over both
        linear(1, temb, 6 * d), linear(1, temb, 6 * d),  # norm1, norm2: once per sample
        (4 * seq * seq * d, 8 * seq * seq * d),  # attention
    ]
    out_channels = c["out_channels"] * p * p * (pt or 1)
    outer = [
        linear(video, c["in_channels"] * p * p * (pt or 1), d, input_grad=False),  # patch embedding
        linear(text, c["text_embed_dim"], d, input_grad=False),  # text projection
        linear(1, d, temb, input_grad=False), linear(1, temb, temb),  # timestep MLP
        linear(1, temb, 2 * d),  # norm_out's adaptive linear
        linear(video, d, out_channels),  # proj_out
    ]
    if c.get("ofs_embed_dim"):
        o = c["ofs_embed_dim"]
        outer += [linear(1, o, o, input_grad=False), linear(1, o, o)]
    block_fwd = sum(f for f, _ in block)
    layers = c["num_layers"]
    # A selective block keeps the Q/K/V projections' and the attention core's outputs.
    kept_fwd = 3 * block[0][0] + block[-1][0]
    counts = block_counts(layers, gradient_checkpointing)
    return SampleFlops(
        forward=layers * block_fwd + sum(f for f, _ in outer),
        backward=layers * sum(b for _, b in block) + sum(b for _, b in outer),
        recompute=counts["all"] * block_fwd + counts["selective"] * (block_fwd - kept_fwd),
        text_tokens=text, video_tokens=video,
    )


# Dense bf16 peak TFLOP/s of one accelerator, by device-name fragment: the default denominator of
# MFU (`train.peak_tflops` overrides it). Hopper figures are the SXM parts'; the PCIe and NVL
# boards run at lower power and clocks, and a wrong peak is worse than none, so they are left out.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}
_LOWER_PEAK_VARIANTS = {"H100": ("PCIE", "NVL"), "H200": ("NVL",)}


def default_peak_tflops(device_name: str) -> float | None:
    """The table's peak for a device name such as torch.cuda.get_device_name(); None if unknown."""
    name = device_name.upper()
    for part, peak in PEAK_TFLOPS.items():
        if part in name and not any(v in name for v in _LOWER_PEAK_VARIANTS.get(part, ())):
            return peak
    return None
