"""Data loaders: latent shards (training) and video shards (precompute)."""
