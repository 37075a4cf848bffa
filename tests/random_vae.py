"""Overrides that give a run a random-init tiny VAE instead of configs/tiny.yaml's pretrained one, for
tests of the inline `precompute.vae.arch` path (seeding, partial arch overrides, scale conventions)."""

ARCH = ("{in_channels: 3, out_channels: 3, "
        "down_block_types: [CogVideoXDownBlock3D, CogVideoXDownBlock3D, CogVideoXDownBlock3D], "
        "up_block_types: [CogVideoXUpBlock3D, CogVideoXUpBlock3D, CogVideoXUpBlock3D], "
        "block_out_channels: [16, 32, 32], latent_channels: 4, layers_per_block: 1, norm_num_groups: 1, "
        "temporal_compression_ratio: 4, sample_height: 64, sample_width: 64}")
RANDOM_VAE = ["precompute.vae.pretrained=null", f"precompute.vae.arch={ARCH}"]
