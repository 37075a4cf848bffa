"""A user error that only one rank sees stops every rank at once, with the culprit named."""

import sys

from PIL import Image

from conftest import REPO
from latent_shards import make_latent_shards
from runs import spawn_ranks


def test_one_rank_cannot_read_its_validation_image_and_all_ranks_stop_together(tmp_path):
    """Two "nodes" without a shared filesystem: the pair's relative image path exists only beside rank 0.

    Before the ranks agreed on their input checks, rank 1 stopped alone while rank 0 went on into
    the engine's first collective and waited there until the process-group timeout (30 minutes).
    """
    shards = tmp_path / "latents"
    make_latent_shards(shards, shards=1, per_shard=4)
    node0, node1 = tmp_path / "node0", tmp_path / "node1"
    node0.mkdir()
    node1.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(node0 / "first.png")
    args = [sys.executable, str(REPO / "launcher" / "train.py"), "--config", str(REPO / "configs" / "tiny.yaml"),
            f"run.output_dir={tmp_path / 'run'}", f"data.latent_shards={shards}", "train.max_steps=2",
            "validation.every_steps=1", "validation.num_inference_steps=1",
            'validation.pairs=[{image: first.png, prompt: "a red square moving up"}]']
    procs = spawn_ranks(args, world=2, cwds=[node0, node1])
    results = [p.communicate(timeout=240) for p in procs]  # a hang would wait for the 30-minute timeout
    codes = [p.returncode for p in procs]
    assert codes == [2, 2], results
    rank0_err, rank1_err = results[0][1], results[1][1]
    assert "validation.pairs[0].image: file not found: first.png" in rank1_err
    assert "rank 1 failed during input checks: validation.pairs[0].image: file not found: first.png" in rank0_err
    assert "Traceback" not in rank0_err + rank1_err
