"""One micro-batch to a loss: timesteps, CFG dropout, noise injection, the DiT's prediction, v-MSE.

Every random draw of a micro-batch is keyed by (seed, index), where `index` is the micro-batch's
global position, not by global RNG state: a resumed run reproduces an uninterrupted one step
for step, and any process that knows the position can rebuild the same inputs.
"""

from __future__ import annotations

import torch

from i2v.core import diffusion, seeding
from i2v.config import Config
from i2v.kernels.noise import inject_noise
from i2v.model.transformer import predict, rotary_embeddings


class Objective:
    """The training loss of one micro-batch, built once per run.

    It owns what every micro-batch shares: the noise schedule (alphas_cumprod), the run's seed, the
    empty-prompt embedding CFG dropout swaps in, the noise backend, the sequence-parallel `layout`
    (i2v.model.parallel; None for none) and the RoPE tables, computed once per latent shape.
    """

    def __init__(self, cfg: Config, device, empty_prompt=None, noise_backend: str = "torch", layout=None):
        self.cfg, self.device, self.empty_prompt = cfg, device, empty_prompt
        self.noise_backend, self.layout = noise_backend, layout
        self.seed = cfg.run.seed
        self.abar = diffusion.alphas_cumprod(cfg.diffusion)
        self._rotary: dict = {}

    def loss(self, model, batch: dict, index: int) -> torch.Tensor:
        """The loss of the micro-batch at global position `index`, which keys all of its randomness."""
        module = getattr(model, "module", model)
        return self.loss_from_inputs(model, self.inputs(batch, index, module.config.patch_size_t))

    def inputs(self, batch: dict, index: int, patch_size_t: int | None = None, return_noise: bool = False) -> dict:
        """Model input, target, prompt and timesteps of one micro-batch.

        CogVideoX-1.5 models patch latent frames in groups of `patch_size_t`; a clip whose latent
        length is not a multiple gets its first latent frame repeated in front, which is what the
        pipeline's sampling layout corresponds to (the image latent stays at frame 0).
        """
        cfg, device = self.cfg, self.device
        x0 = batch["video_latents"].to(device)
        if patch_size_t and x0.shape[1] % patch_size_t:
            pad = patch_size_t - x0.shape[1] % patch_size_t
            x0 = torch.cat([x0[:, :1].expand(-1, pad, -1, -1, -1), x0], dim=1)
        image = batch["image_latents"].to(device)
        prompt = batch["prompt_embeds"].to(device)
        gen = seeding.generator("step", self.seed, index)
        t = diffusion.sample_timesteps(x0.shape[0], cfg.diffusion, gen)
        prompt, image, _, _ = diffusion.cfg_dropout(prompt, image, self.empty_prompt, cfg.diffusion, gen)
        sqrt_a, sqrt_1ma = diffusion.coefficients(self.abar, t)
        out = inject_noise(x0, image, sqrt_a.to(device), sqrt_1ma.to(device), self.seed, index,
                           prediction=cfg.diffusion.prediction, backend=self.noise_backend, return_noise=return_noise)
        inputs = {"model_input": out[0], "target": out[1], "prompt": prompt, "t": t.to(device),
                  "x0": x0, "image": image, "sqrt_a": sqrt_a, "sqrt_1ma": sqrt_1ma}
        if return_noise:
            inputs["noise"] = out[2]
        return inputs

    def loss_from_inputs(self, model, inputs: dict) -> torch.Tensor:
        """The transformer's v (or epsilon) MSE on prepared inputs.

        Under sequence parallelism it is this rank's share of it: the shares of an SP group add up to
        the micro-batch's loss.
        """
        module = getattr(model, "module", model)
        _, frames, _, h, w = inputs["model_input"].shape
        if (frames, h, w) not in self._rotary:
            self._rotary[(frames, h, w)] = rotary_embeddings(module.config, frames, h, w, inputs["model_input"].device)
        rotary = self._rotary[(frames, h, w)]
        if self.layout is not None and self.layout.sp_size > 1:
            from i2v.model.parallel import sharded_loss

            return sharded_loss(model, inputs, self.cfg.diffusion.ofs, rotary, self.layout)
        pred = predict(model, inputs["model_input"], inputs["prompt"], inputs["t"], self.cfg.diffusion.ofs, rotary)
        return diffusion.loss_v_mse(pred, inputs["target"])
