"""i2v: training system for CogVideoX-style image-to-video diffusion transformers."""
