"""Offline data jobs (installed as `i2v.data_prep`): shards, synthetic clips, latent precompute."""
