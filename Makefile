# The two commands a newcomer runs: `make demo` and `make test`. Both build .venv first.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# DeepSpeed JIT-builds a CPU communication op on its first start. Kept in the venv, the build
# belongs to this clone's torch and DeepSpeed: no other clone on the machine invalidates it.
export TORCH_EXTENSIONS_DIR := $(abspath $(VENV))/torch_extensions

.PHONY: test demo bench clean-demo tiny-vae

$(STAMP): requirements-dev.txt setup.py
	python3 -m venv $(VENV)
	# torch first, pinned: the CPU build is found locally, so nothing pulls CUDA wheels.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -r requirements-dev.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	# Build that op now (about 30 s), not in the middle of the first demo or test.
	$(PY) -c "from deepspeed.accelerator import get_accelerator as a; a().create_op_builder('ShareMemCommBuilder').load()"
	touch $(STAMP)

test: $(STAMP)
	# Two workers, a test file each at a time (a file's fixtures are built once): 1384 s for 541 tests on 2 cores.
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15 tests

demo: $(STAMP)
	bash launcher/demo.sh

# The demo's pretrained tiny VAE, committed as configs/tiny-vae: fitted on 768 clips drawn with seed 1000,
# which no demo run draws (DEMO_SEED picks the demo's), about 8 minutes on one core. `make demo` only loads it.
TINY_VAE_RUN := runs/tiny-vae
# Its shape, random-init from run.seed before the fit (launcher/demo.sh's DEMO_VAE=fit uses the same one).
TINY_VAE_ARCH := {in_channels: 3, out_channels: 3, down_block_types: [CogVideoXDownBlock3D, CogVideoXDownBlock3D, CogVideoXDownBlock3D], up_block_types: [CogVideoXUpBlock3D, CogVideoXUpBlock3D, CogVideoXUpBlock3D], block_out_channels: [8, 16, 32], latent_channels: 4, layers_per_block: 1, norm_num_groups: 1, temporal_compression_ratio: 4, sample_height: 64, sample_width: 64}
tiny-vae: $(STAMP)
	$(PY) -m i2v.data.synthetic --output $(TINY_VAE_RUN)/clips --clips 768 --seed 1000 --frames 9 --height 64 --width 64
	$(PY) launcher/make_shards.py --input $(TINY_VAE_RUN)/clips --output $(TINY_VAE_RUN)/shards --samples-per-shard 96
	OMP_NUM_THREADS=1 $(PY) -m i2v.data_prep.fit_vae --config configs/tiny.yaml --clips $(TINY_VAE_RUN)/shards \
	  --out configs/tiny-vae --steps 5000 --image-batch-size 8 --crop-at mixed run.seed=1000 \
	  precompute.vae.pretrained=null "precompute.vae.arch=$(TINY_VAE_ARCH)"

clean-demo:
	rm -rf runs/demo
