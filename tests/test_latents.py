import itertools
import os

import pytest
import torch

from i2v.data.latents import LatentDataset, LatentShardWriter, decode_latent_sample, load_empty_prompt, make_loader
from i2v.core.errors import DataError
from latent_shards import make_latent_shards, sample_tensors


def keys_of(dataset, n_batches=None, workers=0):
    loader = make_loader(dataset, workers)
    batches = loader if n_batches is None else itertools.islice(loader, n_batches)
    return [k for b in batches for k in b["keys"]]


def one_epoch(directory, rank, world, workers, seed=0):
    """Epoch-0 keys of one rank. The shuffle buffer lets an epoch-0 sample surface after epoch-1 ones,
    so read a long prefix (several epochs) and keep epoch 0."""
    ds = LatentDataset(order="stream", shards=str(directory), rank=rank, world_size=world, batch_size=1, seed=seed, shuffle_buffer=4,
                       resampled=False, num_workers=workers)
    batches = itertools.islice(make_loader(ds, workers), 60)
    return [k for b in batches if b["epochs"][0] == 0 for k in b["keys"]]


def test_writer_is_atomic(tmp_path):
    path = tmp_path / "latents-000000.tar"
    video, image, prompt = sample_tensors(0)
    with pytest.raises(RuntimeError):
        with LatentShardWriter(path) as w:
            w.write("a", video, image, prompt)
            raise RuntimeError("crash mid-shard")
    assert not path.exists() and not list(tmp_path.iterdir())
    with LatentShardWriter(path) as w:
        w.write("a", video, image, prompt, {"fps": 8})
    assert path.exists() and not [p for p in tmp_path.iterdir() if ".tmp" in p.name]


def test_writer_rejects_wrong_layout(tmp_path):
    video, image, prompt = sample_tensors(0)
    with LatentShardWriter(tmp_path / "x.tar") as w:
        with pytest.raises(DataError, match=r"clip7: image_latents must be \[K, 1, C, h, w\]"):
            w.write("clip7", video, image[:, 0], prompt)
        w.write("ok", video, image, prompt)


def test_round_trip_and_empty_prompt(tmp_path):
    make_latent_shards(tmp_path, shards=1, per_shard=3)
    ds = LatentDataset(order="stream", shards=str(tmp_path), batch_size=3, shuffle_buffer=0, resampled=False)
    batch = next(iter(make_loader(ds, 0)))
    assert batch["keys"] == ["sample00000", "sample00001", "sample00002"]
    video, image, prompt = sample_tensors(1)
    assert torch.equal(batch["video_latents"][1], video)
    assert torch.equal(batch["image_latents"][1], image[batch["draws"][1]])  # one of the K draws
    assert batch["image_latents"].shape == (3, 1, 4, 16, 16)
    assert torch.equal(batch["prompt_embeds"][1], prompt)
    assert load_empty_prompt(str(tmp_path)).shape == (8, 32)


def test_no_duplicates_across_2_ranks_x_2_workers_and_nothing_missing(tmp_path):
    make_latent_shards(tmp_path, shards=8, per_shard=3)
    seen = []
    for rank in range(2):
        seen += one_epoch(tmp_path, rank, 2, workers=2)
    assert len(seen) == 24 and len(set(seen)) == 24


def test_shuffle_is_seeded(tmp_path):
    make_latent_shards(tmp_path, shards=4, per_shard=5)
    a = one_epoch(tmp_path, 0, 1, 0, seed=1)
    b = one_epoch(tmp_path, 0, 1, 0, seed=1)
    c = one_epoch(tmp_path, 0, 1, 0, seed=2)
    assert a == b and sorted(a) == sorted(c) and a != c
    assert a != sorted(a)  # shuffled within and across shards


def test_start_batch_replays_exactly(tmp_path):
    make_latent_shards(tmp_path, shards=4, per_shard=4)
    full = LatentDataset(order="stream", shards=str(tmp_path), batch_size=2, seed=3, shuffle_buffer=4, resampled=True)
    resumed = LatentDataset(order="stream", shards=str(tmp_path), batch_size=2, seed=3, shuffle_buffer=4, resampled=True, start_batch=5)
    assert keys_of(resumed, 6) == keys_of(full, 11)[10:]


def test_start_batch_replays_with_workers(tmp_path):
    make_latent_shards(tmp_path, shards=4, per_shard=4)
    kw = dict(batch_size=1, seed=3, shuffle_buffer=4, resampled=True, num_workers=2)
    full = keys_of(LatentDataset(order="stream", shards=str(tmp_path), **kw), 12, workers=2)
    resumed = keys_of(LatentDataset(order="stream", shards=str(tmp_path), start_batch=5, **kw), 7, workers=2)
    assert resumed == full[5:]


def test_bad_samples_are_counted_by_reason_and_named(tmp_path):
    corrupt = {1: "nan", 4: "missing_tensor", 7: "wrong_shape", 9: "garbage", 10: "no_latents"}
    make_latent_shards(tmp_path, shards=2, per_shard=6, corrupt=corrupt)
    ds = LatentDataset(order="stream", shards=str(tmp_path), batch_size=1, shuffle_buffer=0, resampled=False, max_bad_fraction=0.9,
                       expect={"channels": 4})
    batches = list(itertools.islice(make_loader(ds, 0), 7))
    keys = [k for b in batches for k in b["keys"]]
    assert len(keys) == 7 and not {f"sample{i:05d}" for i in corrupt} & set(keys)
    counts = batches[-1]["bad"]["by_reason"]
    assert counts == {"non-finite": 1, "missing key": 2, "wrong shape": 1, "undecodable": 1}


def test_too_many_bad_samples_stop_with_a_clear_error(tmp_path):
    make_latent_shards(tmp_path, shards=1, per_shard=10, corrupt={i: "nan" for i in range(0, 10, 2)})
    ds = LatentDataset(order="stream", shards=str(tmp_path), batch_size=1, shuffle_buffer=0, resampled=False, max_bad_fraction=0.2,
                       min_samples_for_bad_check=5)
    with pytest.raises(DataError) as e:
        list(itertools.islice(make_loader(ds, 0), 10))
    msg = str(e.value)
    assert "max_bad_fraction" in msg and "non-finite" in msg and "sample00000" in msg


def test_batches_only_stack_same_shapes(tmp_path):
    make_latent_shards(tmp_path / "a", shards=1, per_shard=4)
    make_latent_shards(tmp_path / "a2", shards=1, per_shard=4, frames=5)
    os.rename(tmp_path / "a2" / "latents-000000.tar", tmp_path / "a" / "latents-000001.tar")
    ds = LatentDataset(order="stream", shards=str(tmp_path / "a"), batch_size=2, shuffle_buffer=8, resampled=False)
    shapes = set()
    for b in itertools.islice(make_loader(ds, 0), 4):
        shapes.add(tuple(b["video_latents"].shape))
    assert shapes == {(2, 3, 4, 16, 16), (2, 5, 4, 16, 16)}


def test_missing_and_empty_shard_paths_are_named(tmp_path):
    with pytest.raises(DataError, match=r"data.latent_shards: shard not found: .*nope-000\.tar"):
        LatentDataset(str(tmp_path / "nope-{000..001}.tar"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds no \*\.tar shards"):
        LatentDataset(str(tmp_path / "empty"))
    (tmp_path / "zero.tar").write_bytes(b"")
    with pytest.raises(DataError, match=r"shard is empty \(0 bytes\): .*zero\.tar"):
        LatentDataset(str(tmp_path / "zero.tar"))
    with pytest.raises(DataError, match="allow_pipe"):
        LatentDataset("pipe:cat x.tar")


def test_too_few_shards_for_readers(tmp_path):
    make_latent_shards(tmp_path, shards=2, per_shard=2)
    with pytest.raises(DataError, match=r"2 shard\(s\) for 2 rank\(s\) x 2 worker\(s\)"):
        LatentDataset(order="stream", shards=str(tmp_path), rank=0, world_size=2, num_workers=2)


def test_decode_rejects_mismatch_with_model():
    from i2v.data.latents import _Bad
    from safetensors.torch import save

    video, image, prompt = sample_tensors(0)
    raw = {"__key__": "k", "latents.safetensors": save({"video_latents": video, "image_latents": image,
                                                         "prompt_embeds": prompt})}
    assert decode_latent_sample(raw, {"channels": 4, "text_dim": 32, "text_len": 8})["__key__"] == "k"
    with pytest.raises(_Bad) as e:
        decode_latent_sample(raw, {"channels": 16})
    assert e.value.reason == "wrong shape" and "the model takes 16" in e.value.detail


# --------------------------------------------------------------------------- the global order


def global_keys(directory, rank, world, n, workers=0, start=0, batch=2, seed=0):
    ds = LatentDataset(str(directory), rank=rank, world_size=world, batch_size=batch, seed=seed,
                       num_workers=workers, start_global=start, order="global")
    return [(b["position"], tuple(b["keys"])) for b in itertools.islice(make_loader(ds, workers), n)]


def test_global_order_is_the_same_at_any_world_size_and_worker_count(tmp_path):
    make_latent_shards(tmp_path, shards=3, per_shard=5)
    one = global_keys(tmp_path, 0, 1, 12)
    assert [p for p, _ in one] == list(range(12))
    two = sorted(global_keys(tmp_path, 0, 2, 6) + global_keys(tmp_path, 1, 2, 6))
    three_workers = sorted(sum((global_keys(tmp_path, r, 3, 4, workers=2) for r in range(3)), []))
    assert two == one and three_workers == one


def test_global_order_epoch_covers_each_sample_once_and_reshuffles(tmp_path):
    make_latent_shards(tmp_path, shards=3, per_shard=5)  # 15 samples -> 7 micro-batches of 2 per epoch
    batches = global_keys(tmp_path, 0, 1, 14)
    epoch0 = [k for _, ks in batches[:7] for k in ks]
    epoch1 = [k for _, ks in batches[7:] for k in ks]
    assert len(set(epoch0)) == 14 and len(set(epoch1)) == 14 and epoch0 != epoch1
    assert global_keys(tmp_path, 0, 1, 7, seed=1) != batches[:7]


def test_global_order_resumes_at_a_position_even_at_another_world_size(tmp_path):
    make_latent_shards(tmp_path, shards=2, per_shard=6)
    full = global_keys(tmp_path, 0, 1, 10)
    # two ranks consumed 3 micro-batches each (6 global), one rank continues
    assert global_keys(tmp_path, 0, 1, 4, start=6) == full[6:10]


def test_global_order_batches_one_shape_and_counts_bad(tmp_path):
    make_latent_shards(tmp_path / "a", shards=1, per_shard=4, corrupt={1: "nan"})
    make_latent_shards(tmp_path / "b", shards=1, per_shard=4, frames=5)
    os.rename(tmp_path / "b" / "latents-000000.tar", tmp_path / "a" / "latents-000001.tar")
    ds = LatentDataset(str(tmp_path / "a"), batch_size=2, order="global", max_bad_fraction=0.5)
    batches = list(itertools.islice(make_loader(ds, 0), 4))
    shapes = {tuple(b["video_latents"].shape[1:]) for b in batches}
    assert shapes == {(3, 4, 16, 16), (5, 4, 16, 16)}
    assert sum(len(b["keys"]) for b in batches) == 7  # the NaN sample is dropped from its batch
    assert batches[-1]["bad"]["by_reason"] == {"non-finite": 1}


def test_global_order_needs_enough_samples_for_a_batch(tmp_path):
    make_latent_shards(tmp_path, shards=1, per_shard=3)
    with pytest.raises(DataError, match="cannot make one micro-batch of 4"):
        LatentDataset(str(tmp_path), batch_size=4, order="global")
