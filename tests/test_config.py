"""Typed YAML configs: round trips, every kind of validation error, overrides, cascades."""

from pathlib import Path

import pytest
import yaml

from imagen.config import (
    BaseUNetConfig,
    ConfigError,
    EfficientUNetConfig,
    StageConfig,
    config_to_dict,
    load_cascade_config,
    load_stage_config,
    save_config,
    stage_config_from_dict,
)
from imagen.loader import parse_yaml

from conftest import REPO_ROOT

STAGE_FILES = sorted(p for p in (REPO_ROOT / "configs").rglob("*.yaml") if p.name != "cascade.yaml")
CASCADE_FILES = sorted((REPO_ROOT / "configs").rglob("cascade.yaml"))


def write_yaml(folder: Path, name: str, data) -> Path:
    path = folder / name
    path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
    return path


@pytest.mark.parametrize("path", STAGE_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_every_shipped_stage_config_round_trips(path, tmp_path):
    config = load_stage_config(path)
    save_config(config, tmp_path / "config.yaml")
    reloaded = load_stage_config(tmp_path / "config.yaml")
    assert reloaded == config
    assert config_to_dict(reloaded) == config_to_dict(config)


@pytest.mark.parametrize("path", STAGE_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_shipped_configs_default_to_the_measured_fast_sampler(path):
    """50 steps of SDE-DPM-Solver++(2M) matched 1000 ancestral steps on the CPU cascade
    (benchmarks/sampler_parity.py, README "Sampling the cascade"); EDM stages take 25 Heun steps,
    as many network evaluations (49), with churn."""
    config = load_stage_config(path)
    expected = ("heun_stochastic", 25) if config.diffusion.formulation == "edm" else ("dpmpp_2m_sde", 50)
    assert (config.sampling.sampler, config.sampling.steps) == expected


@pytest.mark.parametrize("path", CASCADE_FILES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_shipped_cascades_chain_their_resolutions(path):
    cascade = load_cascade_config(path)
    assert len(cascade.stages) >= 2
    assert not cascade.stages[0].is_super_resolution
    for previous, stage in zip(cascade.stages, cascade.stages[1:]):
        assert stage.super_resolution.low_res_size == previous.unet.image_size
        assert stage.unet.image_size > previous.unet.image_size


def test_defaults_are_the_papers_settings():
    config = stage_config_from_dict({})
    assert config.text_encoder.max_length == 77
    assert config.diffusion.schedule == "cosine" and config.diffusion.objective == "eps"
    assert config.guidance.cond_drop_prob == 0.1
    assert config.thresholding.mode == "dynamic" and config.thresholding.percentile == 99.5
    assert isinstance(config.unet, BaseUNetConfig)
    assert config.super_resolution is None


def test_unet_type_selects_the_network_section():
    config = stage_config_from_dict({"unet": {"type": "efficient_unet", "image_size": 64}})
    assert isinstance(config.unet, EfficientUNetConfig)
    # Efficient U-Net: attention only at the lowest resolution unless told otherwise.
    assert config.unet.attention_resolutions == [8]
    assert config.unet.cross_attention_resolutions == [8]
    assert config.unet.level_resolutions() == [64, 32, 16, 8]


def test_save_writes_loadable_yaml_atomically(tmp_path):
    config = stage_config_from_dict({"training": {"batch_size": 7}, "super_resolution": {"low_res_size": 16}})
    target = tmp_path / "run" / "config.yaml"
    save_config(config, target)
    assert [p.name for p in target.parent.iterdir()] == ["config.yaml"]  # no temporary file left behind
    assert load_stage_config(target) == config


# Each case: raw stage dict, overrides, substrings the one-paragraph message must contain.
INVALID = [
    ({"unet": {"chanel_mults": [1, 2]}}, [], ["unknown key 'unet.chanel_mults'", "did you mean 'unet.channel_mults'"]),
    ({"trainig": {}}, [], ["unknown key 'trainig'", "did you mean 'training'"]),
    ({"unet": {"channel_mults": "1,2"}}, [], ["'unet.channel_mults'", "a list of integers", "'1,2'"]),
    ({"unet": {"channel_mults": [1, 2.5]}}, [], ["'unet.channel_mults[1]'", "an integer", "2.5"]),
    ({"training": {"batch_size": "64"}}, [], ["'training.batch_size'", "an integer", "'64'"]),
    ({"training": {"batch_size": True}}, [], ["'training.batch_size'", "an integer", "True"]),
    ({"training": {"compile": "yes"}}, [], ["'training.compile'", "true or false"]),
    ({"training": {"lr": -1.0}}, [], ["'training.lr'", "positive learning rate"]),
    ({"training": {"batch_size": 0}}, [], ["'training.batch_size'", "a positive integer", "got 0"]),
    ({"training": {"adam_betas": [0.9]}}, [], ["'training.adam_betas'", "two numbers"]),
    ({"training": {"ema_decay": 1.0}}, [], ["'training.ema_decay'", "[0, 1)"]),
    ({"training": {"max_minutes": 0}}, [], ["'training.max_minutes'", "positive, finite number of minutes"]),
    ({"training": {"max_minutes": float("inf")}}, [], ["'training.max_minutes'", "finite"]),
    ({"training": {"max_minutes": float("nan")}}, [], ["'training.max_minutes'", "finite"]),
    ({"unet": {"type": "efficient_unet", "image_size": 8, "downsample_first_level": True}}, [],
     ["'unet.channel_mults'", "halve it 4 times", "divisible by 16"]),
    ({"sampling": {"mixed_precision": "bfloat16"}}, [], ["'sampling.mixed_precision'", "'bf16'"]),
    ({"unet": {"type": "efficent_unet"}}, [], ["'unet.type'", "did you mean 'efficient_unet'"]),
    ({"unet": {"image_size": 60}}, [], ["'unet.channel_mults'", "divisible by 8"]),
    ({"unet": {"attention_resolutions": [32, 12]}}, [], ["'unet.attention_resolutions'", "[64, 32, 16, 8]", "[12]"]),
    ({"unet": {"num_head_channels": 48}}, [], ["'unet.num_head_channels'", "divisor"]),
    ({"unet": {"text_projection_dim": 0}}, [], ["'unet.text_projection_dim'", "positive integer or null"]),
    ({"unet": {"dropout": 1.5}}, [], ["'unet.dropout'", "[0, 1)"]),
    ({"unet": {"group_norm_precision": "bf16"}}, [], ["'unet.group_norm_precision'", "'float32'", "'activations'"]),
    ({"unet": {"type": "unet", "self_attention": False}}, [], ["unknown key 'unet.self_attention'", "type 'unet'"]),
    ({"unet": {"type": "efficient_unet", "num_res_blocks": [2, 4]}}, [],
     ["'unet.num_res_blocks'", "one positive count per level"]),
    ({"guidance": {"cond_drop_prob": 1.5}}, [], ["'guidance.cond_drop_prob'", "probability in [0, 1]", "1.5"]),
    ({"guidance": {"null_embedding": "zero"}}, [], ["'guidance.null_embedding'", "did you mean 'zeros'"]),
    ({"diffusion": {"schedule": "cosin"}}, [], ["'diffusion.schedule'", "did you mean 'cosine'"]),
    ({"diffusion": {"timesteps": 1}}, [], ["'diffusion.timesteps'", ">= 2"]),
    ({"thresholding": {"percentile": 120}}, [], ["'thresholding.percentile'", "(0, 100]"]),
    ({"thresholding": {"max_threshold": 0.5}}, [], ["'thresholding.max_threshold'", ">= 1"]),
    ({"sampling": {"steps": 0}}, [], ["'sampling.steps'", "positive integer"]),
    ({"sampling": {"steps": 2000}}, [], ["'sampling.steps'", "diffusion.timesteps (1000)"]),
    ({"sampling": {"sampler": "dpm"}}, [], ["'sampling.sampler'", "'ddpm'", "'ddim'"]),
    ({"sampling": {"guidance": -1}}, [], ["'sampling.guidance'", ">= 0"]),
    ({"sampling": {"eta": 1.5}}, [], ["'sampling.eta'", "[0, 1]"]),
    ({"super_resolution": {}}, [], ["missing required key 'super_resolution.low_res_size'"]),
    ({"super_resolution": {"low_res_size": 64}}, [], ["'super_resolution.low_res_size'", "below unet.image_size (64)"]),
    ({"super_resolution": {"low_res_size": 16, "train_aug_range": [0.5, 0.2]}}, [],
     ["'super_resolution.train_aug_range'"]),
    ({"super_resolution": {"low_res_size": 16, "sample_aug_level": 2}}, [], ["'super_resolution.sample_aug_level'"]),
    ({"text_encoder": {"name": "tiny-scene"}}, [], ["'text_encoder.name'", "did you mean 'tiny-scenes'?"]),
    ({"text_encoder": {"name": "Tiny"}}, [], ["'text_encoder.name'", "did you mean 'tiny'?"]),
    ({"text_encoder": {"max_length": 1}}, [], ["'text_encoder.max_length'", ">= 2"]),
    ({"text_encoder": {"device": "gpu"}}, [], ["'text_encoder.device'", "'cuda:N'"]),
    ({"text_encoder": {"dtype": "fp16"}}, [], ["'text_encoder.dtype'", "'float16'"]),
    ({"data": {"prompt_style": "digits"}}, [], ["'data.prompt_style'", "'words', 'numerals', 'both'"]),
    ({"data": ["mnist"]}, [], ["'data'", "a mapping of keys"]),
    ({}, ["training.batch_size=-3"], ["--set training.batch_size=-3", "'training.batch_size'", "positive"]),
    ({}, ["training.batchsize=3"], ["--set training.batchsize=3", "did you mean 'training.batch_size'"]),
    ({}, ["sampling.guidance=high"], ["--set sampling.guidance=high", "'sampling.guidance'", "a finite number"]),
    ({}, ["training.batch_size"], ["--set training.batch_size", "KEY=VALUE"]),
    ({}, ["training.batch_size.x=1"], ["'training.batch_size'"]),
    ({}, ["sampling.steps=[1"], ["--set sampling.steps=[1", "invalid YAML"]),
]


@pytest.mark.parametrize("raw, overrides, expected", INVALID, ids=[str(i) for i in range(len(INVALID))])
def test_invalid_configs_fail_with_one_clear_message(raw, overrides, expected):
    with pytest.raises(ConfigError) as error:
        stage_config_from_dict(raw, "configs/bad.yaml", overrides)
    message = str(error.value)
    assert message.startswith("configs/bad.yaml") or message.startswith("--set")
    assert "\n" not in message
    for fragment in expected:
        assert fragment in message, f"{fragment!r} missing from: {message}"


def test_overrides_change_values_with_the_same_types_as_yaml(tmp_path):
    path = write_yaml(tmp_path, "stage.yaml", {"training": {"batch_size": 8}})
    config = load_stage_config(
        path,
        [
            "training.batch_size=64",
            "sampling.guidance=5",
            "unet.channel_mults=[1, 2]",
            "unet.attention_resolutions=[32]",
            "unet.cross_attention_resolutions=[]",
            "thresholding.max_threshold=1.5",
            "thresholding.mode=static",
            "training.lr=3e-4",
            "training.grad_clip=null",
            "super_resolution.low_res_size=16",
        ],
    )
    assert config.training.batch_size == 64
    assert config.sampling.guidance == 5.0 and isinstance(config.sampling.guidance, float)
    assert config.unet.channel_mults == [1, 2]
    assert config.thresholding.max_threshold == 1.5 and config.thresholding.mode == "static"
    assert config.training.lr == pytest.approx(3e-4)
    assert config.training.grad_clip is None
    assert config.super_resolution.low_res_size == 16
    # The last override of a key wins, as on any command line.
    assert load_stage_config(path, ["training.batch_size=1", "training.batch_size=2"]).training.batch_size == 2


def test_override_can_switch_the_network_type(tmp_path):
    path = write_yaml(tmp_path, "stage.yaml", {"unet": {"image_size": 32, "channel_mults": [1, 2]}})
    config = load_stage_config(path, ["unet.type=efficient_unet", "unet.num_res_blocks=[1, 2]"])
    assert isinstance(config.unet, EfficientUNetConfig) and config.unet.num_res_blocks == [1, 2]


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = write_yaml(tmp_path, "broken.yaml", "training:\n  batch_size: 8\n  lr: [1e-4\nunet: {}\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: invalid YAML at line 4"):
        load_stage_config(path)


def test_duplicate_keys_are_rejected_not_silently_merged(tmp_path):
    path = write_yaml(tmp_path, "dup.yaml", "training:\n  batch_size: 8\n  batch_size: 16\n")
    with pytest.raises(ConfigError, match=r"dup\.yaml: invalid YAML at line 3.*duplicate key 'batch_size'"):
        load_stage_config(path)


def test_yaml_reads_scientific_numbers_and_keeps_no_as_a_string():
    # PyYAML's YAML 1.1 would give the string '1e-4' and the boolean False here.
    config = stage_config_from_dict(parse_yaml("training:\n  lr: 1e-4\n  mixed_precision: no\n", "x.yaml"))
    assert config.training.lr == pytest.approx(1e-4)
    assert config.training.mixed_precision == "no"


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="nothere.yaml: config file not found"):
        load_stage_config(tmp_path / "nothere.yaml")


def test_top_level_must_be_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match=r"list\.yaml: expected a mapping of keys \(text_encoder, unet, "):
        load_stage_config(write_yaml(tmp_path, "list.yaml", "- 1\n- 2\n"))


def test_an_empty_file_is_refused_and_an_empty_mapping_gives_the_defaults(tmp_path):
    for text in ("", "# only a comment\n"):
        with pytest.raises(ConfigError, match=r"empty.yaml: the config file is empty .*or \{\} to take every default"):
            load_stage_config(write_yaml(tmp_path, "empty.yaml", text))
    assert load_stage_config(write_yaml(tmp_path, "defaults.yaml", "{}")) == StageConfig()


def test_cascade_rejects_mismatched_resolutions(tmp_path):
    write_yaml(tmp_path, "base.yaml", {"unet": {"image_size": 16, "channel_mults": [1, 2],
                                                 "attention_resolutions": [8], "cross_attention_resolutions": [8]}})
    write_yaml(tmp_path, "sr.yaml", {"unet": {"type": "efficient_unet", "image_size": 64},
                                     "super_resolution": {"low_res_size": 32}})
    write_yaml(tmp_path, "cascade.yaml", {"stages": ["base.yaml", "sr.yaml"]})
    with pytest.raises(ConfigError) as error:
        load_cascade_config(tmp_path / "cascade.yaml")
    assert "sr.yaml: super_resolution.low_res_size is 32" in str(error.value)
    assert "base.yaml) produces 16x16" in str(error.value)


def test_cascade_rejects_wrong_stage_kinds_and_channels(tmp_path):
    write_yaml(tmp_path, "base.yaml", {})
    write_yaml(tmp_path, "sr.yaml", {"unet": {"type": "efficient_unet", "image_size": 128, "channels": 3},
                                     "super_resolution": {"low_res_size": 64}})
    write_yaml(tmp_path, "sr_first.yaml", {"stages": ["sr.yaml", "base.yaml"]})
    write_yaml(tmp_path, "two_bases.yaml", {"stages": ["base.yaml", "base.yaml"]})
    write_yaml(tmp_path, "channels.yaml", {"stages": ["base.yaml", "sr.yaml"]})
    write_yaml(tmp_path, "empty.yaml", {"stages": []})
    write_yaml(tmp_path, "missing.yaml", {"stages": ["base.yaml", "nope.yaml"]})
    expectations = {
        "sr_first.yaml": "first cascade stage must be a base stage",
        "two_bases.yaml": "must be a super-resolution stage",
        "channels.yaml": "unet.channels is 3",
        "empty.yaml": "at least one stage file",
        "missing.yaml": "nope.yaml: config file not found",
    }
    for name, fragment in expectations.items():
        with pytest.raises(ConfigError, match=fragment):
            load_cascade_config(tmp_path / name)


def test_stage_errors_inside_a_cascade_name_the_stage_file(tmp_path):
    write_yaml(tmp_path, "base.yaml", {"training": {"batchsize": 3}})
    write_yaml(tmp_path, "cascade.yaml", {"stages": ["base.yaml"]})
    with pytest.raises(ConfigError, match=r"base\.yaml: unknown key 'training.batchsize'"):
        load_cascade_config(tmp_path / "cascade.yaml")


def test_configs_saved_by_earlier_versions_still_load():
    """Checkpoints written before ``diffusion.loss`` was retired hold ``loss: mse``, its only value."""
    assert stage_config_from_dict({"diffusion": {"loss": "mse", "timesteps": 500}}).diffusion.timesteps == 500
    with pytest.raises(ConfigError, match="unknown key 'diffusion.loss'"):
        stage_config_from_dict({"diffusion": {"loss": "l1"}})


def test_a_config_changed_in_code_is_checked_before_it_is_saved(tmp_path):
    from imagen.config import checked_config

    config = load_stage_config("configs/mnist_cpu/base.yaml")
    assert checked_config(config) == config
    for key, value, expected in (("batch_size", -5, "'training.batch_size'"),
                                 ("lr", "fast", "'training.lr': expected a finite number")):
        broken = load_stage_config("configs/mnist_cpu/base.yaml")
        setattr(broken.training, key, value)
        with pytest.raises(ConfigError, match=expected):
            checked_config(broken)
        with pytest.raises(ConfigError, match=r"bad.yaml \(being saved\)"):
            save_config(broken, tmp_path / "bad.yaml")
        assert not (tmp_path / "bad.yaml").exists()
    # Tuples and NumPy numbers set in code are what YAML gives back as lists and numbers.
    import numpy as np

    edited = load_stage_config("configs/mnist_cpu/base.yaml")
    mults = list(edited.unet.channel_mults)
    edited.training.adam_betas, edited.unet.channel_mults = (0.9, 0.99), tuple(mults)
    edited.training.lr = np.float64(2e-4)
    save_config(edited, tmp_path / "edited.yaml")
    reloaded = load_stage_config(tmp_path / "edited.yaml")
    assert reloaded.training.adam_betas == [0.9, 0.99] and reloaded.unet.channel_mults == mults
    assert reloaded.training.lr == 2e-4 and type(reloaded.training.lr) is float
    broken = load_stage_config("configs/mnist_cpu/base.yaml")
    broken.unet.channel_mults = "oops"
    with pytest.raises(ConfigError, match="'unet.channel_mults'"):
        checked_config(broken)
