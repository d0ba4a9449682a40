"""Shared test setup: offline Hugging Face, a private cache folder, the real MNIST folder."""

import os
import tempfile
from pathlib import Path

# Before transformers is imported anywhere: never wait on the network in tests, and build
# the tiny T5 into a throwaway cache instead of the user's home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("IMAGEN_CACHE_DIR", tempfile.mkdtemp(prefix="imagen-test-cache-"))

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The MNIST folder (torchvision layout): $IMAGEN_MNIST_ROOT, or ../shared/data beside the repo."""
    root = Path(os.environ.get("IMAGEN_MNIST_ROOT", REPO_ROOT.parent / "shared" / "data"))
    assert (root / "MNIST" / "raw").is_dir(), (
        f"MNIST not found under {root}; set IMAGEN_MNIST_ROOT to a folder holding MNIST/raw"
    )
    return root
