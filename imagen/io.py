"""Where tensors meet the outside world: devices, the host, files and the cache folder.

Every tensor that leaves the accelerator for the host (to be written, printed or read as a
number) goes through :func:`to_host`, and every seeded generator comes from
:func:`seeded_generator`. Keeping those two crossings in one place is what lets the device
tests run the trainer, the sample grids and evaluation with PyTorch's ``meta`` device
standing in for a GPU: a tensor that reaches the host any other way, or is combined with a
tensor on the other device, fails there as it would on a real GPU.
"""

from __future__ import annotations

import io
import os
import shutil
import sys
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch

from imagen.errors import ImagenError


def resolve_device(device: str | torch.device, setting: str = "--device") -> torch.device:
    """``auto`` means CUDA when available, else CPU. A name PyTorch does not know, or a CUDA or
    MPS device this machine lacks, is an error naming ``setting`` (the argument or config key
    the device came from)."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except RuntimeError:
        raise ImagenError(f"{setting} {device!r}: expected auto, cpu, cuda, cuda:N (N a GPU's index), mps or "
                          "another device PyTorch knows.") from None
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ImagenError(f"{setting} {device}: this machine has no MPS device that PyTorch can use; use cpu or auto.")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (device.index or 0) >= count:
            gpus = f"{count or 'no'} CUDA GPU{'' if count == 1 else 's'}"
            raise ImagenError(f"{setting} {device}: this machine has {gpus} that PyTorch can use; use cpu, auto or "
                              "an existing cuda:N.")
    return device


def resolve_mixed_precision(setting: str, device: torch.device, key: str = "mixed_precision") -> str:
    """The ``mixed_precision`` setting ``key`` for ``device``: ``auto`` is bf16 on a CUDA GPU
    that supports it, else ``no``; other settings stay, with a warning for bf16 on a CPU that
    would emulate it."""
    if setting == "bf16" and device.type == "cpu" and not cpu_computes_bf16():
        warnings.warn(
            f"{key} bf16 on this CPU (PyTorch's CPU capability: {torch.backends.cpu.get_cpu_capability()}), "
            "which has no bf16 arithmetic: a bf16 convolution ran 150x slower than in float32 on such a CPU. "
            "Use auto (float32 on a CPU) or no.", stacklevel=2)
    if setting != "auto":
        return setting
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"


def cpu_computes_bf16() -> bool:
    """Whether PyTorch's oneDNN has bf16 kernels for this CPU (AVX-512 or Arm bf16); without
    them a bf16 convolution is emulated. Assumed so where PyTorch cannot tell."""
    probe = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return probe is None or bool(probe())


def to_host(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` detached and on the CPU.

    The ``meta`` device holds shapes without values (the device tests use it as a stand-in
    accelerator); its tensors arrive as zeros of the same shape and dtype.
    """
    tensor = tensor.detach()
    if tensor.is_meta:
        return torch.zeros(tensor.shape, dtype=tensor.dtype)
    return tensor.cpu()


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device`` without the host waiting for the accelerator: the per-step way
    in, as :func:`to_host` is the way out.

    A plain copy from the host to a GPU waits for every kernel already queued, which stalls
    the training loop once a step; a copy from pinned memory is queued like a kernel. A copy
    pinned here is private to this call, and a batch a DataLoader pinned is never written
    again, so nothing changes the memory before the GPU has read it.
    """
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        tensor = tensor.pin_memory()
    # Only CUDA (and meta, its stand-in in the tests) copies without blocking: an MPS copy so made
    # from pageable memory can read it after it is freed and corrupt the batch (pytorch#189690).
    return tensor.to(device, non_blocking=device.type in ("cuda", "meta"))


def seeded_generator(device: torch.device | str, seed: int) -> torch.Generator:
    """A random generator on ``device`` seeded with ``seed``.

    The ``meta`` device has no generators; its random tensors carry no values, so a CPU
    generator stands in (PyTorch accepts it for meta tensors).
    """
    device = torch.device(device)
    return torch.Generator(device="cpu" if device.type == "meta" else device).manual_seed(seed)


def cache_root() -> Path:
    """Where built artefacts (the tiny T5, the classifier) live: ``$IMAGEN_CACHE_DIR`` or
    ``~/.cache/imagen-mnist``."""
    return Path(os.environ.get("IMAGEN_CACHE_DIR", Path.home() / ".cache" / "imagen-mnist"))


@contextmanager
def file_lock(path: Path, waiting: str | None = None) -> Iterator[None]:
    """Holds an exclusive lock on the file ``path`` (created if missing) across processes;
    ``waiting``, if given, is printed to stderr when another process holds it first."""
    from filelock import FileLock, Timeout

    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(path)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if waiting:
            print(waiting, file=sys.stderr)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def umask_mode(mode: int) -> int:
    """``mode`` (e.g. 0o666 for files, 0o777 for folders) as the process's umask leaves it:
    the permissions an ordinary ``open`` or ``mkdir`` would give."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def atomic_write(path: str | os.PathLike, data: bytes | str, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one.

    The bytes go to a temporary file in the same folder (same filesystem, so the final
    ``os.replace`` is atomic), are flushed to disk, and only then replace ``path``. The
    file gets the permissions the umask gives new files (mkstemp alone would make it 0600).
    ``exclusive`` publishes with ``os.link`` instead, which raises ``FileExistsError`` rather
    than replace a file that appeared at ``path`` in the meantime.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp_name, umask_mode(0o666))
        with os.fdopen(fd, "wb") as tmp:
            tmp.write(payload)
            tmp.flush()
            os.fsync(tmp.fileno())
        if exclusive:
            os.link(tmp_name, path)
            os.unlink(tmp_name)
        else:
            os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def save_png(rows: torch.Tensor | Sequence[torch.Tensor], path: Path, columns: int) -> None:
    """Images in [-1, 1] -> one PNG grid with ``columns`` per row, written atomically.

    ``rows``: one tensor (N, C, H, W), or several (each (N_i, C, H, W)) that may live on
    different devices; each is brought to the host before they are joined.
    """
    from einops import rearrange
    from PIL import Image
    from torchvision.utils import make_grid

    rows = [rows] if isinstance(rows, torch.Tensor) else list(rows)
    images = torch.cat([to_host(row).float() for row in rows])
    grid = make_grid((images + 1) / 2, nrow=columns, padding=2, pad_value=0.5)
    pixels = rearrange((grid.clamp(0, 1) * 255).round().to(torch.uint8), "c h w -> h w c").numpy()
    image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write(path, buffer.getvalue())


def prepare_output(output: Path, owned: Sequence[str], overwrite: bool, setting: str = "--output-dir") -> None:
    """Check, before any work, that results can go to the folder ``output``: it is a folder or
    can be made one (made and removed again, so that a run refused later leaves nothing
    behind) and, unless ``overwrite``, holds none of the files the patterns ``owned`` name
    (earlier results of the same script)."""
    if output.exists() and not output.is_dir():
        raise ImagenError(f"{setting} {output} is a file, not a folder; choose a folder for the results.")
    earlier = sorted(path.name for pattern in owned for path in output.glob(pattern))
    if earlier and not overwrite:
        raise ImagenError(f"{setting} {output} already holds results ({', '.join(earlier[:4])}); pass --overwrite "
                          "to replace them or choose another folder.")
    remove_made_folders(output, make_folders(output, setting))


def make_folders(folder: Path, setting: str) -> Path | None:
    """Make ``folder`` and its missing parents; the outermost one made, or None if it existed."""
    missing = [path for path in (folder, *folder.parents) if not path.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ImagenError(f"{setting} {folder}: cannot create the folder ({error.strerror or error}).") from None
    return missing[-1] if missing else None


def remove_made_folders(folder: Path, outermost: Path | None) -> None:
    """Undo :func:`make_folders`: remove ``folder`` and its parents up to ``outermost`` while empty."""
    if outermost is None:
        return
    for path in (folder, *folder.parents):
        try:
            path.rmdir()
        except OSError:  # not empty: someone else's files are in it now
            return
        if path == outermost:
            return


@contextmanager
def new_results(output: Path, owned: Sequence[str], setting: str = "--output-dir") -> Iterator[Path]:
    """A hidden folder inside ``output`` to write a script's results into; when the block ends
    without error they replace the earlier results in ``output`` (see :func:`publish`), and
    after an error they are discarded and ``output`` is as it was (not there, if it was not)."""
    outermost = make_folders(output, setting)
    staging = Path(tempfile.mkdtemp(prefix=".new-", dir=output))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        remove_made_folders(output, outermost)
        raise
    publish(staging, output, owned)


def publish(staging: Path, output: Path, owned: Sequence[str]) -> None:
    """Move the results written to ``staging`` into ``output``, replacing earlier results there
    (every file or folder the patterns ``owned`` name, so none is left stale). Nothing is
    deleted before the new results are in place; other files in ``output`` stay."""
    replaced = Path(tempfile.mkdtemp(prefix=".replaced-", dir=output))
    moved: list[Path] = []
    try:
        for path in [path for pattern in owned for path in output.glob(pattern)]:
            os.replace(path, replaced / path.name)
        for path in list(staging.iterdir()):
            os.replace(path, output / path.name)
            moved.append(output / path.name)
    except OSError as error:  # put everything back as it was
        for path in moved:
            os.replace(path, staging / path.name)
        for path in replaced.iterdir():
            os.replace(path, output / path.name)
        raise ImagenError(f"{output}: cannot put the new results in place ({error}); they are in {staging}, the "
                          "earlier ones are unchanged.") from None
    staging.rmdir()
    shutil.rmtree(replaced)
