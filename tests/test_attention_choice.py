"""`kernels.attention: auto` chooses by measurement on CUDA: the choice logic (fake timings), the cache in the
run directory, the run's shape, the restricted-SDPA processor, and the CPU, where nothing is timed."""

import json
import math

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel
from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0
from diffusers.models.embeddings import get_3d_rotary_pos_embed
from torch.nn.attention import SDPBackend

from conftest import REPO
from i2v.config.loader import load_config
from i2v.core.distributed import DistEnv
from i2v.kernels.attention_choice import CANDIDATES, cache_key, choose_attention, choose_cached, measure_attention
from i2v.model.attention import CogVideoXFlashAttnProcessor, apply_attention_backend
from i2v.model.transformer import transformer_arch
from i2v.train.attention_auto import CACHE_NAME, attention_shape, auto_attention, describe

CPU = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
FRAMES, HEIGHT, WIDTH, TEXT = 2, 4, 6, 5


def _tiny_model():
    torch.manual_seed(0)
    model = CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=8, out_channels=4, time_embed_dim=16,
        text_embed_dim=24, num_layers=1, sample_width=WIDTH, sample_height=HEIGHT, sample_frames=(FRAMES - 1) * 4 + 1,
        patch_size=2, max_text_seq_length=TEXT, use_rotary_positional_embeddings=True,
    )
    with torch.no_grad():  # the default init zeroes some projections
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def _forward_backward(model):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1, FRAMES, 8, HEIGHT, WIDTH, generator=gen)
    text = torch.randn(1, TEXT, 24, generator=gen)
    rope = get_3d_rotary_pos_embed(embed_dim=16, crops_coords=((0, 0), (HEIGHT // 2, WIDTH // 2)),
                                   grid_size=(HEIGHT // 2, WIDTH // 2), temporal_size=FRAMES)
    out = model(x, text, torch.tensor([500]), image_rotary_emb=rope, return_dict=False)[0]
    model.zero_grad()
    (out ** 2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _processors(model):
    return list(model.attn_processors.values())


# ----------------------------------------------------------------------------- choice (fake timings)


def test_the_fastest_wins():
    assert choose_attention({"triton": 36.5, "sdpa-cudnn": 32.7, "sdpa-flash": 41.0}) == "sdpa-cudnn"
    assert choose_attention({"sdpa-efficient": 9.0, "sdpa-flash": 12.0}) == "sdpa-efficient"
    assert choose_attention({"triton": 1.0}) == "triton"


def test_ties_go_to_triton_then_cudnn_flash_efficient():
    assert CANDIDATES == ("triton", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient")
    assert choose_attention({"sdpa-efficient": 5.0, "sdpa-flash": 5.0, "sdpa-cudnn": 5.0, "triton": 5.0}) == "triton"
    assert choose_attention({"sdpa-efficient": 5.0, "sdpa-flash": 5.0, "sdpa-cudnn": 5.0}) == "sdpa-cudnn"
    assert choose_attention({"sdpa-efficient": 5.0, "sdpa-flash": 5.0}) == "sdpa-flash"


def test_unusable_times_are_ignored_and_none_left_is_an_error():
    assert choose_attention({"triton": math.nan, "sdpa-flash": math.inf, "sdpa-efficient": 3.0}) == "sdpa-efficient"
    with pytest.raises(ValueError, match="no attention candidate"):
        choose_attention({})
    with pytest.raises(ValueError, match="no attention candidate"):
        choose_attention({"triton": math.nan})
    with pytest.raises(ValueError, match="unknown attention candidates"):
        choose_attention({"sdpa-math": 1.0})


# ----------------------------------------------------------------------------- cache


class CountingMeasure:
    """A measure function with given times that counts its calls."""

    def __init__(self, times):
        self.times, self.calls = times, 0

    def __call__(self):
        self.calls += 1
        return dict(self.times)


KEY = {"device": "NVIDIA H200", "shape": [1, 48, 17776, 64], "dtype": "bfloat16", "torch": "2.13", "cudnn": 91000,
       "triton": "3.7"}


def test_first_call_measures_and_the_second_reads_the_cache(tmp_path):
    path = tmp_path / CACHE_NAME
    measure = CountingMeasure({"triton": 36.5, "sdpa-cudnn": 32.7})
    assert choose_cached(path, KEY, measure) == ("sdpa-cudnn", {"triton": 36.5, "sdpa-cudnn": 32.7}, False)
    assert measure.calls == 1
    stored = json.loads(path.read_text())
    assert stored == {"key": KEY, "times_ms": {"triton": 36.5, "sdpa-cudnn": 32.7}, "choice": "sdpa-cudnn"}

    assert choose_cached(path, KEY, measure) == ("sdpa-cudnn", {"triton": 36.5, "sdpa-cudnn": 32.7}, True)
    assert measure.calls == 1
    # A tuple shape is the same key as the list that JSON reads back.
    assert choose_cached(path, {**KEY, "shape": (1, 48, 17776, 64)}, measure)[2] is True
    assert measure.calls == 1


@pytest.mark.parametrize("field,value", [("device", "NVIDIA H100 80GB HBM3"), ("shape", [2, 48, 17776, 64]),
                                         ("dtype", "float16"), ("torch", "2.14"), ("triton", None)])
def test_a_changed_key_measures_again_and_rewrites(tmp_path, field, value):
    path = tmp_path / CACHE_NAME
    choose_cached(path, KEY, CountingMeasure({"triton": 2.0, "sdpa-flash": 3.0}))
    other = {**KEY, field: value}
    measure = CountingMeasure({"triton": 4.0, "sdpa-flash": 3.0})
    assert choose_cached(path, other, measure) == ("sdpa-flash", {"triton": 4.0, "sdpa-flash": 3.0}, False)
    assert measure.calls == 1
    assert json.loads(path.read_text())["key"] == other
    assert choose_cached(path, other, measure)[2] is True and measure.calls == 1


@pytest.mark.parametrize("text", ["", "{not json", "[1, 2]", '{"key": {}}', json.dumps({"key": KEY, "times_ms": 3}),
                                  json.dumps({"key": KEY, "times_ms": {"bogus": 1.0}}),
                                  json.dumps({"key": KEY, "times_ms": {"triton": "slow"}})])
def test_a_corrupt_file_measures_again_and_is_rewritten_whole(tmp_path, text):
    path = tmp_path / CACHE_NAME
    path.write_text(text)
    measure = CountingMeasure({"sdpa-efficient": 7.0})
    assert choose_cached(path, KEY, measure) == ("sdpa-efficient", {"sdpa-efficient": 7.0}, False)
    assert measure.calls == 1
    assert json.loads(path.read_text())["choice"] == "sdpa-efficient"
    assert [p.name for p in tmp_path.iterdir()] == [CACHE_NAME]  # no temporary left behind


def test_a_measurement_with_nothing_usable_raises_and_writes_nothing(tmp_path):
    path = tmp_path / CACHE_NAME
    with pytest.raises(ValueError, match="no attention candidate"):
        choose_cached(path, KEY, CountingMeasure({}))
    assert not path.exists()


def test_the_key_names_what_a_time_depends_on():
    key = cache_key((1, 2, 3, 4), torch.bfloat16, "cpu")
    assert key["device"] == "cpu" and key["shape"] == [1, 2, 3, 4] and key["dtype"] == "bfloat16"
    assert key["torch"] == torch.__version__ and set(key) == {"device", "shape", "dtype", "torch", "cudnn", "triton"}


def test_measuring_needs_cuda():
    with pytest.raises(ValueError, match="needs a CUDA device"):
        measure_attention((1, 2, 8, 16), torch.float32, "cpu")


# ----------------------------------------------------------------------------- the run's shape and the start-up line


def test_the_shape_is_the_5b_runs_attention_call():
    cfg = load_config(REPO / "configs" / "cogvideox-5b-i2v.yaml")
    with torch.device("meta"):
        config = CogVideoXTransformer3DModel(**transformer_arch(cfg.model)).config
    assert attention_shape(cfg, config) == (1, 48, 17_776, 64)  # 226 text + 13 x 30 x 45 video tokens
    cfg.parallel.sequence_parallel_size = 2  # the whole sequence, half the heads
    cfg.train.micro_batch_size = 2
    assert attention_shape(cfg, config) == (2, 24, 17_776, 64)


def test_the_start_up_line_names_the_choice_and_every_time():
    line = describe("sdpa-cudnn", {"triton": 36.5, "sdpa-flash": 41.0, "sdpa-cudnn": 32.7}, (1, 48, 17776, 64),
                    torch.bfloat16, "RUN/attention_choice.json", cached=True)
    assert line == ("attention: auto -> sdpa-cudnn (fwd+bwd at 1x48x17776x64 bf16: sdpa-cudnn 32.7 ms, triton 36.5 ms, "
                    "sdpa-flash 41.0 ms; cached in RUN/attention_choice.json)")
    line = describe("triton", {"triton": 1.0}, (1, 2, 3, 4), torch.float16, "R/a.json", cached=False,
                    skipped={"sdpa-flash": "RuntimeError: No available kernel."})
    assert "triton 1.0 ms; sdpa-flash skipped: RuntimeError: No available kernel.; measured, saved to R/a.json" in line


# ----------------------------------------------------------------------------- CPU: unchanged


def test_auto_on_the_cpu_is_torch_without_timing(tmp_path):
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"run.output_dir={tmp_path}"])
    assert cfg.kernels.attention == "auto"
    lines = []
    assert auto_attention(cfg, CPU, {}, lines.append) == ("auto", None)  # no model config read: nothing measured
    assert lines == [] and list(tmp_path.iterdir()) == []
    model = _tiny_model()
    assert apply_attention_backend(model, "auto", device="cpu", sdpa_backend=None) == "torch"
    assert all(type(p) is CogVideoXAttnProcessor2_0 for p in _processors(model))
    for forced in ("triton", "torch"):
        cfg.kernels.attention = forced
        assert auto_attention(cfg, CPU, {}, lines.append) == (forced, None)


# ----------------------------------------------------------------------------- the restricted-SDPA processor


def test_a_restricted_torch_processor_equals_the_unrestricted_one():
    model = _tiny_model()
    ref_out, ref_grads = _forward_backward(model)  # diffusers' processor, SDPA as torch picks it
    for module in model.modules():
        if hasattr(module, "set_processor"):
            module.set_processor(CogVideoXFlashAttnProcessor("torch", sdpa_backend=SDPBackend.MATH))
    out, grads = _forward_backward(model)
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_the_restriction_is_applied():
    """Restricted to a backend the CPU lacks, SDPA has no kernel to run: the restriction reaches the call."""
    model = _tiny_model()
    assert apply_attention_backend(model, "torch", sdpa_backend="sdpa-cudnn") == "sdpa-cudnn"
    assert all(isinstance(p, CogVideoXFlashAttnProcessor) and p.backend == "torch"
               and p.sdpa_backend == SDPBackend.CUDNN_ATTENTION for p in _processors(model))
    with pytest.raises(RuntimeError, match="No viable backend"):
        _forward_backward(model)
    # Back to plain "torch": diffusers' processors, no restriction.
    assert apply_attention_backend(model, "torch") == "torch"
    assert all(type(p) is CogVideoXAttnProcessor2_0 for p in _processors(model))


def test_a_restriction_needs_backend_torch():
    with pytest.raises(ValueError, match="sdpa_backend applies to backend 'torch'"):
        CogVideoXFlashAttnProcessor("triton", sdpa_backend=SDPBackend.MATH)
    with pytest.raises(ValueError, match="not an SDPA candidate"):
        apply_attention_backend(_tiny_model(), "torch", sdpa_backend="triton")
