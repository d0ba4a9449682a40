"""T5 text encoding: the offline tiny T5, masks, truncation, errors and the embedding cache."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from imagen.captions import normalize_prompt
from imagen.config import TextEncoderConfig, misspelled_offline_t5
from imagen.text import (
    T5TextEncoder,
    TextEmbeddingCache,
    TextEncoderError,
    build_tiny_t5,
    encoder_identity,
    make_tiny_t5,
)

from conftest import REPO_ROOT

PROMPTS = ["seven", "7", "a handwritten digit three", "", "zéro ünïcode ✓"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return build_tiny_t5(tmp_path_factory.mktemp("t5") / "tiny")


@pytest.fixture(scope="module")
def encoder(tiny_folder) -> T5TextEncoder:
    return T5TextEncoder(str(tiny_folder), max_length=24, device="cpu")


def test_tiny_t5_reloaded_through_from_pretrained_has_the_built_weights_and_embeddings(tiny_folder, encoder):
    tokenizer, model = make_tiny_t5()
    batch = tokenizer(PROMPTS, padding="max_length", max_length=24, truncation=True, return_tensors="pt")
    with torch.no_grad():
        direct = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    loaded = encoder.encode(PROMPTS)
    mask = batch["attention_mask"].bool()
    assert torch.equal(loaded.mask, mask)
    built, reloaded = model.state_dict(), encoder.model.state_dict()
    assert reloaded.keys() == built.keys() and all(torch.equal(reloaded[name], built[name]) for name in built)
    # The same weights; the attention kernel from_pretrained picks may round otherwise.
    torch.testing.assert_close(loaded.embeddings[mask], direct[mask], rtol=1e-5, atol=1e-6)
    # The files are what from_pretrained reads for a real T5.
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= {
        p.name for p in tiny_folder.iterdir()
    }


def test_tiny_t5_is_deterministic(tmp_path):
    first = build_tiny_t5(tmp_path / "a")
    second = build_tiny_t5(tmp_path / "b")
    for name in ("model.safetensors", "tokenizer.json"):
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_tiny_tokenizer_keeps_digit_words_whole(encoder):
    tokenizer = encoder.tokenizer
    for prompt in ["seven", "7", "nine"]:
        assert tokenizer.convert_ids_to_tokens(tokenizer(prompt)["input_ids"]) == ["▁" + prompt, "</s>"]
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 1 and tokenizer.unk_token_id == 2


def test_masks_match_token_counts_and_padding_is_zero(encoder):
    encoded = encoder.encode(PROMPTS)
    assert encoded.embeddings.shape == (len(PROMPTS), 24, encoder.dim)
    assert encoded.embeddings.dtype == torch.float32 and encoded.mask.dtype == torch.bool
    for row, prompt in enumerate(PROMPTS):
        count = len(encoder.tokenizer(prompt)["input_ids"])
        assert int(encoded.mask[row].sum()) == count
        assert encoded.mask[row, :count].all()  # real tokens first, then padding
        assert encoded.embeddings[row, count:].abs().sum() == 0
        assert encoded.embeddings[row, :count].abs().sum(-1).min() > 0
    # The empty prompt still has its </s>, so no row is fully masked.
    assert int(encoded.mask[PROMPTS.index("")].sum()) == 1


def test_embeddings_do_not_depend_on_batch_neighbours(encoder):
    together = encoder.encode(["seven", "a handwritten digit three"])
    alone = encoder.encode(["seven"])
    assert torch.allclose(together.embeddings[0], alone.embeddings[0], atol=1e-6)


def test_long_prompts_are_truncated_with_a_warning_naming_them_briefly(encoder):
    prompt = "seven " * 40
    with pytest.warns(UserWarning, match="truncated to text_encoder.max_length=24") as record:
        encoded = encoder.encode([prompt, "7"])
    message = str(record[0].message)
    assert "'seven seven seven" in message and "(240 characters)" in message and len(message) < 200
    assert bool(encoded.mask[0].all())
    ids = encoder.tokenizer([prompt], padding="max_length", max_length=24, truncation=True)["input_ids"][0]
    assert ids[-1] == encoder.tokenizer.eos_token_id  # truncation keeps the closing </s>


def test_encoder_is_frozen_and_in_eval_mode(encoder):
    assert not encoder.model.training
    assert all(not p.requires_grad for p in encoder.model.parameters())
    assert not encoder.encode(["seven"]).embeddings.requires_grad


def test_reduced_precision_encoder_stays_close_to_float32(tiny_folder, encoder):
    half = T5TextEncoder(str(tiny_folder), max_length=24, dtype="bfloat16", device="cpu")
    assert next(half.model.parameters()).dtype == torch.bfloat16
    reference, approx = encoder.encode(PROMPTS), half.encode(PROMPTS)
    assert approx.embeddings.dtype == torch.float32
    assert torch.equal(reference.mask, approx.mask)
    error = (reference.embeddings - approx.embeddings).abs().max() / reference.embeddings.abs().max()
    assert 0 < error < 0.1


def test_tiny_name_builds_into_the_cache_once():
    first = T5TextEncoder("tiny", max_length=8, device="cpu")
    stamp = (Path(os.environ["IMAGEN_CACHE_DIR"]) / "tiny-t5-v1" / "model.safetensors").stat().st_mtime_ns
    second = T5TextEncoder("tiny", max_length=8, device="cpu")
    assert (Path(os.environ["IMAGEN_CACHE_DIR"]) / "tiny-t5-v1" / "model.safetensors").stat().st_mtime_ns == stamp
    assert torch.equal(first.encode(["3"]).embeddings, second.encode(["3"]).embeddings)


def test_missing_local_folder_is_a_clear_error(tmp_path):
    with pytest.raises(TextEncoderError, match=r"folder '.*nothere' \(text_encoder.name\) does not exist.*tiny"):
        T5TextEncoder(str(tmp_path / "nothere"))


def test_unreachable_hub_id_is_a_clear_error():
    # HF_HUB_OFFLINE=1 (conftest) stands in for a machine without network.
    start = time.monotonic()
    with pytest.raises(TextEncoderError) as error:
        T5TextEncoder("google/t5-v1_1-not-a-model")
    message = str(error.value)
    assert "'google/t5-v1_1-not-a-model' (text_encoder.name)" in message
    assert "local folder" in message and "tiny" in message
    assert time.monotonic() - start < 30


def test_misspelled_offline_name_is_refused_at_once_naming_the_intended_one(monkeypatch):
    monkeypatch.setattr("imagen.text.load_t5", lambda *args: pytest.fail("a misspelled name must not reach the hub"))
    with pytest.raises(TextEncoderError, match=r"'tiny-scenes-pretrain' \(text_encoder.name\): did you mean "
                       r"'tiny-scenes-pretrained'\?"):
        T5TextEncoder("tiny-scenes-pretrain")


@pytest.mark.parametrize("name", ["t5-small", "google/t5-v1_1-small", "tiny"])
def test_hub_ids_and_offline_names_are_not_taken_for_misspellings(name):
    assert misspelled_offline_t5(name) is None


def test_a_folder_named_like_a_misspelling_is_loaded_as_a_folder(tiny_folder, tmp_path, monkeypatch):
    shutil.copytree(tiny_folder, tmp_path / "tiny-scene")
    monkeypatch.chdir(tmp_path)
    assert misspelled_offline_t5("tiny-scene") is None
    encoder = T5TextEncoder("tiny-scene", max_length=8, device="cpu")
    reference = T5TextEncoder(str(tiny_folder), max_length=8, device="cpu")
    assert torch.equal(encoder.encode(["3"]).embeddings, reference.encode(["3"]).embeddings)


# Loads an encoder with the network on (HF_HUB_OFFLINE unset) but every connection refused;
# prints how many were for model files (huggingface_hub's file_download.py, not its one-off
# user-agent lookup in _detect_agent.py) and the embedding width.
NETWORK_REFUSED = """
import socket, sys, traceback
attempts = []
def refuse(*args, **kwargs):
    files = [frame.filename for frame in traceback.extract_stack()]
    if any(f.endswith("file_download.py") for f in files) and not any(f.endswith("_detect_agent.py") for f in files):
        attempts.append(args)
    raise OSError("network refused by the test")
socket.getaddrinfo = socket.create_connection = socket.socket.connect = refuse
from imagen.text import T5TextEncoder
encoder = T5TextEncoder(sys.argv[1], device="cpu")
print(len(attempts), encoder.dim)
"""


def test_a_hub_id_in_the_local_cache_loads_without_touching_the_network(tiny_folder, tmp_path):
    # The Hugging Face cache layout: models--OWNER--NAME/{refs/main, snapshots/REVISION/...}.
    cached = tmp_path / "hf" / "hub" / "models--acme--t5-tiny"
    (cached / "refs").mkdir(parents=True)
    (cached / "refs" / "main").write_text("0123abcd")
    shutil.copytree(tiny_folder, cached / "snapshots" / "0123abcd")
    env = {key: value for key, value in os.environ.items() if key != "HF_HUB_OFFLINE"}
    result = subprocess.run([sys.executable, "-c", NETWORK_REFUSED, "acme/t5-tiny"], capture_output=True, text=True,
                            env={**env, "HF_HOME": str(tmp_path / "hf")}, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0", "128"]  # no file fetched; the tiny T5's width


class CountingEncoder:
    """Wraps a real encoder and records which prompts it was asked to encode."""

    def __init__(self, encoder):
        self.encoder = encoder
        self.calls: list[str] = []

    def encode(self, prompts):
        self.calls.extend(prompts)
        return self.encoder.encode(prompts)


def test_cache_serves_identical_tensors_and_encodes_each_prompt_once(encoder, tmp_path):
    counting = CountingEncoder(encoder)
    loads = []
    cache = TextEmbeddingCache(lambda: loads.append(1) or counting, "tiny-test", max_length=24)
    cached = cache.encode(["seven", "7", "seven", "", "7", "three"])
    # The cache encodes the unique prompts as one batch; a batch of another size may round differently.
    direct = encoder.encode(["seven", "7", "", "three"])
    rows = [0, 1, 0, 2, 1, 3]
    assert torch.equal(cached.mask, direct.mask[rows])
    assert torch.equal(cached.embeddings, direct.embeddings[rows])
    cache.encode(["three", "seven"] * 10)
    assert sorted(counting.calls) == sorted(["seven", "7", "", "three"])
    assert loads == [1]  # the encoder is loaded once, lazily


def test_disk_cache_never_loads_the_encoder_again(encoder, tmp_path):
    prompts = ["seven", "one two", "9"]
    first = TextEmbeddingCache(lambda: encoder, "tiny-test", max_length=24, disk_dir=tmp_path)
    expected = first.encode(prompts)
    assert len(list(tmp_path.glob("*.safetensors"))) == 3

    def refuse():
        raise AssertionError("the encoder must not be loaded when every prompt is on disk")

    second = TextEmbeddingCache(refuse, "tiny-test", max_length=24, disk_dir=tmp_path)
    served = second.encode(prompts)
    assert torch.equal(served.embeddings, expected.embeddings) and torch.equal(served.mask, expected.mask)
    # Another encoder or max_length must not reuse these files.
    other = TextEmbeddingCache(lambda: CountingEncoder(encoder), "other-model", max_length=24, disk_dir=tmp_path)
    other.encode(["seven"])
    assert other.encoder.calls == ["seven"]


def test_release_encoder_keeps_embeddings(encoder):
    cache = TextEmbeddingCache(lambda: encoder, "tiny-test", max_length=24)
    cache.precompute(["4", "four"])
    cache.release_encoder()
    assert cache._encoder is None
    assert cache.encode(["four"]).mask.sum() == 2


def test_cache_from_config_is_lazy_and_keys_on_the_model(tiny_folder):
    config = TextEncoderConfig(name=str(tiny_folder), max_length=10, device="cpu")
    cache = TextEmbeddingCache.from_config(config)
    assert cache._encoder is None  # nothing loaded until a prompt is needed
    assert cache.encode(["5"]).embeddings.shape == (1, 10, 128)
    assert encoder_identity("tiny") != encoder_identity(str(tiny_folder))
    assert encoder_identity("google/t5-v1_1-xxl") == "google/t5-v1_1-xxl"


def test_importing_the_library_never_touches_the_network():
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise RuntimeError('network used at import')\n"
        "socket.socket.connect = refuse\n"
        "socket.create_connection = refuse\n"
        "socket.getaddrinfo = refuse\n"
        "import imagen, imagen.config, imagen.text, imagen.data, imagen.cli\n"
        "from imagen.config import stage_config_from_dict\n"
        "from imagen.text import TextEmbeddingCache\n"
        "TextEmbeddingCache.from_config(stage_config_from_dict({}).text_encoder)\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_prompts_that_read_the_same_share_one_embedding_under_the_tiny_t5s_normalisation():
    assert TextEncoderConfig(name="tiny").normalize == "plain"  # auto: the tiny T5 has no pretraining
    assert TextEncoderConfig(name="google/t5-v1_1-small").normalize == "spacing"  # a real T5 is cased
    variants = ["seven", "Seven", "SEVEN", "  seven  ", "seven.", "Seven!"]
    plain = TextEmbeddingCache.from_config(TextEncoderConfig(name="tiny", max_length=8, device="cpu"))
    encoded = plain.encode(variants)
    assert all(torch.equal(encoded.embeddings[0], row) for row in encoded.embeddings[1:])
    raw = TextEmbeddingCache.from_config(TextEncoderConfig(name="tiny", max_length=8, device="cpu", normalize="none"))
    # The training prompts are unchanged. Encoded alone, as the normalising cache encodes its one
    # unique prompt: a batch of another size may round differently (it does on AVX-512 CPUs).
    assert torch.equal(raw.encode(["seven"]).embeddings[0], encoded.embeddings[0])
    unnormalised = raw.encode(variants)
    for index in (1, 2, 4, 5):  # without it, case and punctuation give other embeddings
        assert not torch.equal(unnormalised.embeddings[0], unnormalised.embeddings[index]), variants[index]


def test_normalisation_modes():
    assert normalize_prompt("  Seven\t\tthe  Digit. ", "spacing") == "Seven the Digit."
    assert normalize_prompt("  Seven\t\tthe  Digit. ", "plain") == "seven the digit"
    assert normalize_prompt("ﬁve, 7!", "plain") == "five 7"  # NFKC folds the ligature
    assert normalize_prompt(" as typed ", "none") == " as typed "
    with pytest.raises(ValueError):
        normalize_prompt("x", "lower")


def test_text_the_tokenizer_does_not_know_is_named_in_a_warning(encoder):
    with pytest.warns(UserWarning, match=r"prompt 'café ✓ 7': the \S*tiny tokenizer does not know 'é', '✓'"):
        encoder.encode(["café ✓ 7"])
