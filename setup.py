"""One distribution, `i2v`. `data_prep/` installs as `i2v.data_prep`. The Triton kernels live
inside the package, in `i2v/kernels/`: a top-level `kernels/` folder would shadow the Hugging Face
package of that name wherever the checkout's root is on sys.path (`python -m pytest`, `python -c`,
pip's own build of this file), and transformers >= 5.25 imports that package."""

from setuptools import setup

setup(
    name="i2v",
    version="0.1.0",
    description="Training system for CogVideoX-style image-to-video diffusion transformers",
    python_requires=">=3.10",
    packages=["i2v", "i2v.core", "i2v.config", "i2v.kernels", "i2v.data", "i2v.model", "i2v.checkpoint",
              "i2v.sample", "i2v.train", "i2v.plan", "i2v.data_prep"],
    package_dir={"i2v": "i2v", "i2v.data_prep": "data_prep"},
    # Loose on purpose: users bring their own CUDA torch and triton. The exact CPU
    # environment used by `make test` is pinned in requirements-dev.txt.
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.15",
        "diffusers>=0.32",
        "accelerate",
        "peft>=0.15",
        "transformers>=4.46",
        "tokenizers",
        "webdataset>=0.2.90",
        "av>=12",
        "safetensors",
        "tensorboard",
        "pyyaml",
        "tqdm",
        "numpy",
        "pillow",
    ],
    # s3:// shards (and S3-compatible stores) are read through boto3; http(s):// needs nothing extra.
    # model.fp8: torchao's float8 training (and its CPU emulation).
    extras_require={"triton": ["triton>=3.6,<3.9"], "s3": ["boto3>=1.28"], "fp8": ["torchao>=0.15"]},
)
