"""Data: real MNIST digits with word/numeral prompts, and captioned image folders."""

from pathlib import Path

import pytest
import torch
from PIL import Image

from imagen.captions import DIGIT_WORDS, digit_prompts
from imagen.config import DataConfig
from imagen.data import CaptionFolderDataset, DataError, MNISTTextDataset, build_dataset, to_model_images


@pytest.fixture(scope="module")
def mnist(mnist_root) -> MNISTTextDataset:
    return MNISTTextDataset(mnist_root, image_size=32, channels=1, prompt_style="both", seed=0)


def label_of(prompt: str) -> int:
    return DIGIT_WORDS.index(prompt) if prompt in DIGIT_WORDS else int(prompt)


def test_mnist_images_have_the_stage_shape_and_range(mnist):
    assert len(mnist) == 5000  # the offline training subset
    images, prompt_indices = mnist.get_batch(torch.arange(256))
    assert images.shape == (256, 1, 32, 32) and images.dtype == torch.float32
    assert images.min() == -1.0 and images.max() <= 1.0 and images.max() > 0.9
    # MNIST digits are white strokes on black: most pixels sit at the background value.
    assert (images < -0.9).float().mean() > 0.6
    assert prompt_indices.shape == (256,)


def test_prompts_match_labels_in_every_style(mnist_root):
    for style in ("words", "numerals", "both"):
        data = MNISTTextDataset(mnist_root, image_size=16, prompt_style=style)
        prompts = [data[i][1] for i in range(300)]
        assert [label_of(p) for p in prompts] == data.labels[:300].tolist()
        if style == "words":
            assert all(p in DIGIT_WORDS for p in prompts)
        if style == "numerals":
            assert all(p.isdigit() for p in prompts)
        assert set(data.prompts) == set(digit_prompts(style))


def test_both_style_mixes_words_and_numerals_reproducibly(mnist_root, mnist):
    numerals = (mnist.prompt_indices >= 10).float().mean()
    assert 0.45 < numerals < 0.55
    again = MNISTTextDataset(mnist_root, image_size=32, prompt_style="both", seed=0)
    assert torch.equal(again.prompt_indices, mnist.prompt_indices)
    other_seed = MNISTTextDataset(mnist_root, image_size=32, prompt_style="both", seed=1)
    assert not torch.equal(other_seed.prompt_indices, mnist.prompt_indices)
    before = mnist.prompt_indices.clone()
    mnist.set_epoch(1)
    changed = (mnist.prompt_indices != before).float().mean()
    mnist.set_epoch(0)
    assert 0.4 < changed < 0.6  # a new draw per epoch
    assert torch.equal(mnist.prompt_indices, before)


def test_item_and_batch_agree(mnist):
    image, prompt = mnist[7]
    images, prompt_indices = mnist.get_batch([7])
    assert torch.equal(image, images[0])
    assert prompt == mnist.prompts[int(prompt_indices[0])]


def test_resizing_is_antialiased_and_keeps_the_digit(mnist_root):
    data = MNISTTextDataset(mnist_root, image_size=7, prompt_style="words")
    small, _ = data.get_batch(torch.arange(64))
    reference = torch.nn.functional.avg_pool2d(data.raw_images[:64].float() / 255, 4) * 2 - 1
    # Antialiased shrinking is close to area averaging; plain subsampling would not be.
    assert (small - reference).abs().mean() < 0.08
    subsampled = data.raw_images[:64, :, 1::4, 1::4].float() / 255 * 2 - 1
    assert (small - subsampled).abs().mean() > (small - reference).abs().mean()


def test_three_channel_and_test_split(mnist_root):
    data = MNISTTextDataset(mnist_root, image_size=16, channels=3, split="test", prompt_style="numerals")
    assert len(data) == 10000
    image, prompt = data[3]
    assert image.shape == (3, 16, 16)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])
    assert int(prompt) == int(data.labels[3])


def test_folder_without_mnist_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"data.root .* holds no MNIST train split.*MNIST/raw.*data.download"):
        MNISTTextDataset(tmp_path, image_size=16, download=False)


def test_missing_mnist_is_downloaded_by_default_and_offline_the_error_names_the_way_out(tmp_path, monkeypatch):
    from torchvision.datasets import MNIST

    assert DataConfig().download  # a first run on a connected machine just works
    attempts = []

    def offline(self):
        attempts.append(self.root)
        Path(self.raw_folder).mkdir(parents=True, exist_ok=True)  # as torchvision does before fetching
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz: <urlopen error Name or service not known>")

    monkeypatch.setattr(MNIST, "download", offline)
    with pytest.raises(DataError) as error:
        build_dataset(DataConfig(root=str(tmp_path)), 16, 1)
    message = str(error.value)
    assert attempts == [str(tmp_path)]
    assert "downloading it failed" in message and "Name or service not known" in message
    assert str(tmp_path / "MNIST" / "raw") in message and "--set data.root=../shared/data" in message
    # The folders the failed download made are gone; folders that were there stay.
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(DataError):
        build_dataset(DataConfig(root=str(tmp_path / "new" / "data")), 16, 1)
    assert list(tmp_path.iterdir()) == []


def test_to_model_images_converts_rgb_to_grey():
    rgb = torch.zeros(1, 3, 4, 4, dtype=torch.uint8)
    rgb[:, 0] = 255  # pure red
    grey = to_model_images(rgb, 4, channels=1)
    assert grey.shape == (1, 1, 4, 4)
    assert torch.allclose(grey, torch.full_like(grey, 0.299 * 2 - 1))


def make_caption_folder(root, count=6):
    (root / "sub").mkdir(parents=True)
    captions = []
    for index in range(count):
        folder = root / ("sub" if index % 2 else "")
        pixels = torch.full((20, 30, 3), index * 40, dtype=torch.uint8)
        pixels[:, :5] = 255  # a bright band on the left, cropped away by the square centre crop
        Image.fromarray(pixels.numpy()).save(folder / f"img{index}.png")
        caption = f"a grey square {index % 3}"
        (folder / f"img{index}.txt").write_text(caption + "\n")
        captions.append(caption)
    return captions


def test_caption_folder_dataset(tmp_path):
    make_caption_folder(tmp_path)
    data = CaptionFolderDataset(tmp_path, image_size=8, channels=3)
    assert len(data) == 6
    assert sorted(data.prompts) == ["a grey square 0", "a grey square 1", "a grey square 2"]
    for index in range(len(data)):
        image, caption = data[index]
        number = int(data.image_paths[index].stem[3:])
        assert caption == f"a grey square {number % 3}"
        assert image.shape == (3, 8, 8)
        # Centre crop of a 30x20 image keeps columns 5..24, so the bright band is gone.
        assert torch.allclose(image, torch.full_like(image, number * 40 / 255 * 2 - 1), atol=1e-5)
    images, prompt_indices = data.get_batch([0, 1])
    assert images.shape == (2, 3, 8, 8) and prompt_indices.tolist() == [
        data.prompts.index(data[0][1]),
        data.prompts.index(data[1][1]),
    ]


def test_caption_folder_errors(tmp_path):
    with pytest.raises(DataError, match="is not a folder"):
        CaptionFolderDataset(tmp_path / "missing", image_size=8)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no images"):
        CaptionFolderDataset(tmp_path / "empty", image_size=8)
    make_caption_folder(tmp_path / "data")
    (tmp_path / "data" / "img2.txt").unlink()
    with pytest.raises(DataError, match=r"1 image\(s\) have no caption file.*img2\.txt"):
        CaptionFolderDataset(tmp_path / "data", image_size=8)


def test_build_dataset_follows_the_data_section(mnist_root, tmp_path):
    data = build_dataset(DataConfig(root=str(mnist_root), prompt_style="words", split="test"), 16, 1)
    assert isinstance(data, MNISTTextDataset) and len(data) == 10000 and data.prompts == list(DIGIT_WORDS)
    make_caption_folder(tmp_path)
    folder = build_dataset(DataConfig(dataset="caption_folder", root=str(tmp_path)), 8, 1)
    assert isinstance(folder, CaptionFolderDataset) and folder[0][0].shape == (1, 8, 8)
