"""Shared test setup: offline Hugging Face, a private cache folder, no GPU, the real MNIST folder."""

import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

# Before transformers is imported anywhere: never wait on the network in tests, and build
# the tiny T5 into a throwaway cache instead of the user's home.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist each of the workers (one per core) runs its tests, and the scripts they
# start, on one thread: workers of several threads each stall on one another's thread barriers.
if "PYTEST_XDIST_WORKER" in os.environ:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("IMAGEN_CACHE_DIR", tempfile.mkdtemp(prefix="imagen-test-cache-"))
# The suite checks the CPU's behaviour, the same on every machine (some tests need "auto" to
# mean the CPU, or "cuda" to be missing); a GPU's paths are benchmarks/device_paths.sh's. Set
# before CUDA starts, so that no test process, nor any script it starts, sees a GPU.
os.environ["CUDA_VISIBLE_DEVICES"] = ""

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(items):
    """The slow tests first, so that the workers fill in around them with short ones rather than
    one worker running a long test alone at the end; then those that use the classifier. Each
    worker starts on its own contiguous share of this order, so the first trains the classifier
    while the others run tests that do not wait for it."""
    items.sort(key=lambda item: (item.get_closest_marker("slow") is None, "classifier" not in item.fixturenames))


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    """The MNIST folder (torchvision layout): $IMAGEN_MNIST_ROOT, or ../shared/data beside the repo."""
    root = Path(os.environ.get("IMAGEN_MNIST_ROOT", REPO_ROOT.parent / "shared" / "data"))
    assert (root / "MNIST" / "raw").is_dir(), (
        f"MNIST not found under {root}; set IMAGEN_MNIST_ROOT to a folder holding MNIST/raw"
    )
    return root


def python(*args, cwd=REPO_ROOT) -> subprocess.CompletedProcess:
    """Run a Python script of the repository in a subprocess, capturing its output."""
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture
def uninstalled(tmp_path) -> dict:
    """The environment of a lent GPU machine, where the repository is a checkout and imagen is not
    installed: ``python`` on its PATH sees every installed package but this one."""
    import site

    bin_folder = tmp_path / "uninstalled-bin"
    bin_folder.mkdir()
    wrapper = bin_folder / "python"
    # -S skips the .pth files, the editable install among them; PYTHONPATH brings back the rest.
    wrapper.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} -S "$@"\n')
    wrapper.chmod(0o755)
    packages = [*site.getsitepackages(), site.getusersitepackages()]
    env = {**os.environ, "PATH": f"{bin_folder}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join(packages)}
    probe = subprocess.run(["python", "-c", "import torch, transformers; import imagen"], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=120)
    # torch and transformers imported; imagen did not (an editable install, as .ci/run makes, lives in a .pth file).
    assert "No module named 'imagen'" in probe.stderr, probe.stderr
    return env


def randomized(network):
    """Zero-initialised layers make a fresh U-Net output exactly 0; perturb every weight (seeded)
    so that each input visibly reaches the output. Returns the network in eval mode."""
    import torch

    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.05)
    return network.eval()


class HostWaits:
    """Within ``with HostWaits() as waits:``, ``waits.copies`` lists (operation, shape, dtype) of
    every copy from the host to another device that the host has to wait for.

    On a GPU such a copy (``.to(device)`` of an ordinary CPU tensor) first waits for every
    kernel already queued, so a training loop that makes one per step can never run ahead of
    the GPU. The meta device stands in for the GPU; asynchronous copies (``non_blocking``,
    from pinned memory on CUDA: ``imagen.io.to_device``) are not counted.
    """

    def __enter__(self) -> "HostWaits":
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode

        copies = self.copies = []
        aten = torch.ops.aten

        class Recorder(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                result = func(*args, **kwargs)
                if func is aten._to_copy.default:
                    source, asynchronous = args[0], kwargs.get("non_blocking", False)
                elif func is aten.copy_.default:
                    source, asynchronous = args[1], args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
                else:
                    return result
                if source.device.type == "cpu" and result.device.type != "cpu" and not asynchronous:
                    copies.append((str(func), tuple(source.shape), source.dtype))
                return result

        self.recorder = Recorder()
        self.recorder.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.recorder.__exit__(*exc)


@pytest.fixture
def tiny_stage(mnist_root):
    """Makes stage configs small enough to train a step in a fraction of a second on MNIST:
    ``tiny_stage(super_resolution=False, **training)`` gives a 16x16 base stage (or an 8->16
    Efficient U-Net), the tiny T5 with 8 tokens, 2 sampling steps and 2 training steps of 4
    images, with ``training`` settings overridden."""
    from imagen.config import stage_config_from_dict

    def make(super_resolution: bool = False, **training):
        unet = {"image_size": 16, "base_channels": 16, "channel_mults": [1, 2], "num_head_channels": 16}
        if super_resolution:
            unet.update(type="efficient_unet", num_res_blocks=[1, 1])
        else:
            unet.update(num_res_blocks=1, attention_resolutions=[8], cross_attention_resolutions=[8])
        settings = {"batch_size": 4, "max_steps": 2, "warmup_steps": 1, "log_every": 1, "checkpoint_every": 2,
                    "sample_every": 1000, "sample_guidance": [1.0]}
        raw = {"text_encoder": {"name": "tiny", "max_length": 8, "device": "cpu"}, "unet": unet,
               "sampling": {"steps": 2}, "data": {"root": str(mnist_root)}, "training": {**settings, **training}}
        if super_resolution:
            raw["super_resolution"] = {"low_res_size": 8}
        return stage_config_from_dict(raw)

    return make


@pytest.fixture(scope="session")
def trained(mnist_root, tmp_path_factory) -> Path:
    """The CPU cascade's two stages, each trained for two steps through its script:
    ``<folder>/base`` and ``<folder>/sr``."""
    root = tmp_path_factory.mktemp("cascade")
    quick = ["--set", f"data.root={mnist_root}", "--set", "training.batch_size=4", "--set", "training.max_steps=2",
             "--set", "sampling.steps=2", "--set", "training.sample_guidance=[1]"]
    for script, config, name in (("train_base_mnist.py", "configs/mnist_cpu/base.yaml", "base"),
                                 ("train_sr_mnist.py", "configs/mnist_cpu/sr.yaml", "sr")):
        result = python(script, "--config", config, "--output-dir", str(root / name), *quick)
        assert result.returncode == 0, result.stderr
    return root


@pytest.fixture(scope="session")
def classifier(mnist_root):
    """The project's MNIST classifier, trained once into the test cache (the CLI tests reuse it)."""
    from imagen.classifier import load_or_train_classifier

    return load_or_train_classifier(mnist_root, progress=False)
