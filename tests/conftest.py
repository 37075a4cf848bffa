import os

# Triton kernels run on the CPU through the interpreter; this must be set before any
# kernel is defined, i.e. before `i2v.kernels` is imported anywhere.
os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
# DeepSpeed JIT-builds its CPU ops (shared-memory comm, CPU Adam) into one per-user cache; clones
# with their own environments would rebuild them over each other's there (about a minute each).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".venv" / "torch_extensions"))
SHARED_VIDEOS = REPO.parent / "shared" / "videos"


@pytest.fixture
def shared_videos():
    """The real clips in ../shared/videos; tests using them skip cleanly when it is absent."""
    if not SHARED_VIDEOS.is_dir():
        pytest.skip(f"real clips not present at {SHARED_VIDEOS}")
    return SHARED_VIDEOS


@pytest.fixture(scope="session")
def lora_run(tmp_path_factory):
    """Run A of tests/lora_runs.py (2-rank ZeRO-2 LoRA + EMA), trained once for every test that reads it."""
    from latent_shards import make_latent_shards
    from lora_runs import RUN_A, TORCHRUN, train

    root = tmp_path_factory.mktemp("lora_run")
    make_latent_shards(root / "latents", shards=4, per_shard=8)
    r = train(TORCHRUN, root / "run", root / "latents", *RUN_A)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {"run": str(root / "run"), "shards": str(root / "latents"), "stdout": r.stdout}
