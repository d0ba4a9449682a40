"""The README's Python examples run as written, against trained stages and the real MNIST."""

import re
from pathlib import Path

from imagen.checkpoint import list_checkpoints

from conftest import REPO_ROOT


def python_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (REPO_ROOT / "README.md").read_text(), flags=re.S)


def test_every_python_example_in_the_readme_runs(trained, mnist_root, tmp_path, monkeypatch):
    # The examples run from a checkout: configs/, runs/mnist_cpu/{base,sr} and ../shared/data.
    (tmp_path / "work" / "runs").mkdir(parents=True)
    (tmp_path / "work" / "configs").symlink_to(REPO_ROOT / "configs")
    (tmp_path / "work" / "runs" / "mnist_cpu").symlink_to(trained)
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "data").symlink_to(mnist_root)
    monkeypatch.chdir(tmp_path / "work")
    namespace = {}
    for example in python_examples():
        exec(compile(example, "README.md", "exec"), namespace)
    # What the examples state: the cascade's outputs and the text shapes in their comments.
    out, text = namespace["out"], namespace["text"]
    assert out.images.shape == (2, 1, 32, 32) and [s.shape[-1] for s in out.stages] == [16, 32]
    assert out.images.min() >= -1 and out.images.max() <= 1
    assert text.embeddings.shape == (8, 16, 128) and text.mask.shape == (8, 16)
    assert not text.mask.all(dim=1).any()  # padding is masked
    trained_here = Path("runs/notebook_base")
    assert namespace["trainer"].step == 10 and (trained_here / "samples" / "step_00000010.png").is_file()
    assert [p.name for p in list_checkpoints(trained_here)] == ["step_00000010"]
