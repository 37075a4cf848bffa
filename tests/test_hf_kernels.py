"""Nothing in the checkout shadows Hugging Face's `kernels` package.

transformers (>= 5.25) imports `kernels` when it is installed. A top-level folder of ours named
`kernels` would be imported in its place wherever the checkout's root is on sys.path, and
`from transformers import T5EncoderModel` would then fail (docs/architecture.md, "Where the Triton
kernels live"). requirements-dev.txt installs the real package, so these tests run against it."""

import subprocess
import sys

from conftest import REPO

# What a user's script and our library do first: the model classes whose import reaches transformers'
# hub-kernels integration, then our own kernels under their installed name.
PROBE = ("import kernels, transformers, diffusers; from transformers import T5EncoderModel; "
         "from diffusers import CogVideoXTransformer3DModel; import i2v.kernels.noise, i2v.kernels.attention; "
         "print(kernels.__file__)")


def _site_packages_file(path: str) -> bool:
    return "site-packages" in path and not path.startswith(str(REPO / "kernels"))


def test_hugging_face_kernels_is_what_import_kernels_finds_under_pytest():
    # `make test` runs python -m pytest from the checkout's root
    import kernels
    from transformers import T5EncoderModel  # the import reaches transformers' hub-kernels integration
    from transformers.utils import is_kernels_available

    assert _site_packages_file(kernels.__file__), kernels.__file__
    assert is_kernels_available(), "transformers does not see the pinned kernels package"
    assert T5EncoderModel.__module__.startswith("transformers.")


def test_transformers_and_diffusers_import_from_the_checkout_root():
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert _site_packages_file(r.stdout.strip().splitlines()[-1]), r.stdout


def test_a_top_level_kernels_folder_would_shadow_it(tmp_path):
    """The reason the Triton kernels stay in i2v/kernels/: the same probe, from a root holding a
    `kernels` package, fails inside transformers."""
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text('"""A project\'s own kernels."""\n')
    r = subprocess.run([sys.executable, "-c", PROBE], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "kernels" in r.stderr, r.stdout[-2000:] + r.stderr[-2000:]
