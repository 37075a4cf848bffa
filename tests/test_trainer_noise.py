"""The trainer's loss with the fused noise kernel equals the torch path given the same noise."""


import pytest
import torch

from i2v.config import load_config
from i2v.data.latents import LatentDataset, make_loader
from i2v.kernels.noise import inject_noise_ref
from i2v.model.transformer import build_transformer
from i2v.train.objective import Objective
from conftest import REPO
from latent_shards import make_latent_shards


@pytest.mark.parametrize("prediction", ["v", "epsilon"])
def test_trainer_loss_identical_with_torch_and_triton_given_same_noise(tmp_path, prediction):
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"diffusion.prediction={prediction}",
                                                      "diffusion.text_dropout=0.5", "diffusion.image_dropout=0.5",
                                                      "run.seed=7"])
    make_latent_shards(tmp_path, shards=1, per_shard=4)
    batch = next(iter(make_loader(LatentDataset(str(tmp_path), batch_size=4, shuffle_buffer=0, resampled=False), 0)))
    model = build_transformer(cfg.model, seed=0)
    torch.nn.init.normal_(model.proj_out.weight, std=0.02)  # a non-zero prediction, so the loss depends on the input
    objective = Objective(cfg, "cpu", empty_prompt=None, noise_backend="triton")

    fused = objective.inputs(batch, 3, return_noise=True)
    ref = dict(fused)
    ref["model_input"], ref["target"] = inject_noise_ref(fused["x0"], fused["image"], fused["sqrt_a"],
                                                         fused["sqrt_1ma"], fused["noise"], prediction)
    assert not torch.equal(fused["model_input"], torch.zeros_like(fused["model_input"]))
    loss_fused = objective.loss_from_inputs(model, fused)
    loss_ref = objective.loss_from_inputs(model, ref)
    assert loss_fused.item() == loss_ref.item()
    # and the noise really enters the loss: another stream gives another loss
    other = objective.inputs(batch, 4)
    assert objective.loss_from_inputs(model, other).item() != loss_fused.item()


def test_cogvideox_15_pads_latent_frames_to_patch_size_t(tmp_path):
    """1.5-style models patch frames in pairs: 3 latent frames train as 4, first frame repeated in front."""
    arch = {**load_config(REPO / "configs" / "tiny.yaml").model.arch, "patch_size_t": 2, "ofs_embed_dim": 32,
            "use_learned_positional_embeddings": False}
    cfg = load_config(REPO / "configs" / "tiny.yaml", [f"model.arch={arch}".replace("'", '"'), "diffusion.ofs=2.0"])
    make_latent_shards(tmp_path, shards=1, per_shard=2)
    batch = next(iter(make_loader(LatentDataset(str(tmp_path), batch_size=2, shuffle_buffer=0, resampled=False), 0)))
    model = build_transformer(cfg.model, seed=0)
    objective = Objective(cfg, "cpu")
    inputs = objective.inputs(batch, 0, patch_size_t=2)
    assert inputs["model_input"].shape == (2, 4, 8, 16, 16)
    assert torch.equal(inputs["x0"][:, 0], inputs["x0"][:, 1])  # the repeated first latent frame
    assert torch.count_nonzero(inputs["model_input"][:, 1:, 4:]) == 0  # image latent only at frame 0
    loss = objective.loss(model, batch, 0)
    assert torch.isfinite(loss)
