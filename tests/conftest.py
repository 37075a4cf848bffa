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
    from lora_runs import RUN_A
    from runs import TORCHRUN, train

    root = tmp_path_factory.mktemp("lora_run")
    make_latent_shards(root / "latents", shards=4, per_shard=8)
    r = train(TORCHRUN, root / "run", root / "latents", *RUN_A)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return {"run": str(root / "run"), "shards": str(root / "latents"), "stdout": r.stdout}


@pytest.fixture(scope="module")
def shards_layout():
    """How many latent shards `shards` writes and how many samples each holds; a test module that
    wants another layout overrides this fixture."""
    return dict(shards=4, per_shard=8)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, shards_layout):
    """Latent shards for the training runs of one test module (a module's own `shards` fixture, such
    as tests/test_precompute.py's video shards, takes its place there)."""
    from latent_shards import make_latent_shards

    d = tmp_path_factory.mktemp("latents")
    make_latent_shards(d, **shards_layout)
    return d
