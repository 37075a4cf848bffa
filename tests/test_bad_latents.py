"""Bad latent data is counted and named, never a traceback: truncated and unreadable shards, in both
reading orders (stream and global), each bad item named once however often it is read."""

import itertools
import os
import subprocess
import sys
import tarfile

import pytest

from conftest import REPO
from i2v.data.latents import LatentDataset, make_loader
from i2v.data.shards import BadSamples
from i2v.core.errors import DataError
from latent_shards import make_latent_shards

ORDERS = ["stream", "global"]


def cut(path, at: int) -> None:
    """Keep the first `at` bytes of `path`: a copy or write cut short."""
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[:at])


def member_offsets(path) -> dict:
    with tarfile.open(path) as t:
        return {m.name: (m.offset, m.offset_data, m.size) for m in t}


def dataset(directory, order, **kw):
    kw = {"batch_size": 1, "shuffle_buffer": 0, "resampled": False, "max_bad_fraction": 0.9, **kw}
    return LatentDataset(str(directory), order=order, **kw)


def read(ds, n):
    return list(itertools.islice(make_loader(ds, 0), n))


def epochs(directory, order, n=1):
    """(keys of each epoch, bad counts by reason) after reading every shard exactly `n` times."""
    ds = dataset(directory, order)
    if order == "global":
        batches = read(ds, n * ds.batches_per_epoch)  # micro-batches of 1: one per sample
        by_epoch = [[k for b in batches if b["epochs"][0] == e for k in b["keys"]] for e in range(n)]
        return by_epoch, batches[-1]["bad"]["by_reason"]
    bad = BadSamples(max_fraction=0.9)
    samples = list(ds._samples(((e, url) for e in range(n) for url in ds.urls), bad))
    return [[s["__key__"] for s in samples if s["epoch"] == e] for e in range(n)], dict(bad.by_reason)


ALL = [f"sample{i:05d}" for i in range(12)]


@pytest.mark.parametrize("order", ORDERS)
def test_a_shard_cut_inside_a_member_is_counted_and_its_complete_samples_are_used(tmp_path, order):
    paths = make_latent_shards(tmp_path, shards=3, per_shard=4)
    _, start, size = member_offsets(paths[1])["sample00006.latents.safetensors"]
    cut(paths[1], start + size // 2)  # inside the third sample of shard 1
    by_epoch, by_reason = epochs(tmp_path, order, n=2)
    want = sorted(set(ALL) - {"sample00006", "sample00007"})
    assert [sorted(k) for k in by_epoch] == [want, want]
    assert by_reason == {"truncated shard": 2}  # once each time the shard is read


@pytest.mark.parametrize("order", ORDERS)
def test_a_shard_cut_between_members_is_not_silently_short(tmp_path, order):
    # tarfile itself ends such a file quietly, as if the shard were complete.
    paths = make_latent_shards(tmp_path, shards=3, per_shard=4)
    header, _, _ = member_offsets(paths[1])["sample00006.latents.safetensors"]
    cut(paths[1], header)
    by_epoch, by_reason = epochs(tmp_path, order)
    assert sorted(by_epoch[0]) == sorted(set(ALL) - {"sample00006", "sample00007"})
    assert by_reason == {"truncated shard": 1}


@pytest.mark.parametrize("order", ORDERS)
def test_an_unreadable_shard_is_counted_and_the_others_train(tmp_path, order):
    paths = make_latent_shards(tmp_path, shards=3, per_shard=4)
    with open(paths[2], "wb") as f:
        f.write(os.urandom(4096))
    by_epoch, by_reason = epochs(tmp_path, order)
    assert sorted(by_epoch[0]) == ALL[:8]
    assert by_reason == {"unreadable shard": 1}


@pytest.mark.parametrize("order", ORDERS)
def test_too_many_bad_shards_stop_naming_the_path_once(tmp_path, order):
    paths = make_latent_shards(tmp_path, shards=4, per_shard=4)
    cut(paths[2], os.path.getsize(paths[2]) // 2)
    # Judged after 40 reads: the shard is read in several epochs first, and named once all the same.
    ds = dataset(tmp_path, order, max_bad_fraction=0.01, min_samples_for_bad_check=40)
    with pytest.raises(DataError) as e:
        read(ds, 100)
    msg = str(e.value)
    assert msg.count(paths[2]) == 1, msg
    assert "truncated shard" in msg and "max_bad_fraction" in msg


@pytest.mark.parametrize("order", ORDERS)
def test_a_corrupt_sample_read_every_epoch_is_named_once(tmp_path, order):
    make_latent_shards(tmp_path, shards=2, per_shard=4, corrupt={5: "nan"})
    ds = dataset(tmp_path, order, max_bad_fraction=0.01, min_samples_for_bad_check=32)
    with pytest.raises(DataError) as e:
        read(ds, 100)
    msg = str(e.value)
    assert msg.count("sample00005") == 1, msg
    # The counts stay honest: every read counts, the bad sample's too (4 epochs of 8 reads by the 32nd).
    assert "4 of 32" in msg and "non-finite" in msg


def test_global_order_with_no_readable_sample_names_the_shards(tmp_path):
    paths = make_latent_shards(tmp_path, shards=2, per_shard=2)
    for p in paths:
        with open(p, "wb") as f:
            f.write(b"not a tar file " * 100)
    with pytest.raises(DataError) as e:
        LatentDataset(str(tmp_path), batch_size=1, order="global")
    msg = str(e.value)
    assert all(p in msg for p in paths) and "unreadable shard" in msg


def test_bad_samples_name_each_key_once_and_count_every_read():
    bad = BadSamples(max_fraction=0.5, min_samples=10)
    for _ in range(3):
        bad.add_bad("shard.tar:k1", "non-finite", "NaN")
    bad.add_bad("shard.tar:k2", "undecodable")
    assert bad.bad == 4 and bad.by_reason == {"non-finite": 3, "undecodable": 1}
    assert [k for k, _, _ in bad.examples] == ["shard.tar:k1", "shard.tar:k2"]
    report = bad.take_report()
    other = BadSamples(max_fraction=1.0, min_samples=1)
    other.add_bad("shard.tar:k1", "non-finite", "NaN")
    other.add_report(report)
    assert other.bad == 5 and [k for k, _, _ in other.examples] == ["shard.tar:k1", "shard.tar:k2"]


def test_the_limit_is_judged_once_enough_samples_were_read():
    # Bad items read before `min_samples` are judged as soon as that many samples were seen,
    # not only when the next bad item comes.
    bad = BadSamples(max_fraction=0.1, min_samples=5)
    bad.add_bad("a.tar", "truncated shard")
    for _ in range(3):
        bad.add_good()
    with pytest.raises(DataError, match=r"1 of 5 .*a\.tar: truncated shard"):
        bad.add_good()


def test_training_on_a_truncated_shard_stops_with_one_line_naming_it(tmp_path):
    paths = make_latent_shards(tmp_path / "latents", shards=4, per_shard=8)
    cut(paths[2], os.path.getsize(paths[2]) // 2)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    r = subprocess.run([sys.executable, "launcher/train.py", "--config", "configs/tiny.yaml",
                        f"run.output_dir={tmp_path / 'run'}", f"data.latent_shards={tmp_path / 'latents'}",
                        "train.max_steps=20", "data.max_bad_fraction=0.01"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, r.stdout[-3000:] + r.stderr[-3000:]
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout, r.stderr[-3000:]
    error = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and paths[2] in error[0] and "truncated shard" in error[0], r.stderr[-3000:]
