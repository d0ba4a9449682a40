"""The EDM formulation (imagen.elucidated) checked against an exact oracle, and wired through a stage.

For data x0 ~ N(mu, s^2 I) and x = x0 + sigma n the optimal denoiser is known in closed form,
D*(x; sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu). Undoing the preconditioning turns it into
the optimal network F, so the samplers must reproduce the data's statistics.
"""

import math

import pytest
import torch

from imagen import elucidated, samplers
from imagen.cascade import Cascade
from imagen.checkpoint import latest_checkpoint
from imagen.config import SAMPLERS, ConfigError, stage_config_from_dict
from imagen.elucidated import ElucidatedDiffusion, sample
from imagen.errors import ImagenError
from imagen.guidance import ClassifierFreeGuidance
from imagen.samplers import Inpainting
from imagen.stage import build_augmentation_process, build_diffusion, build_network, sample_stage, training_losses
from imagen.super_resolution import downsample
from imagen.text import EncodedText
from imagen.trainer import Trainer

MU, S = 0.3, 0.5
SHAPE = (2048, 1, 4, 4)


def oracle(edm: ElucidatedDiffusion, mu: float = MU, s: float = S):
    """The optimal network F(c_in x, c_noise) for N(mu, s^2) data."""

    def model_fn(scaled_x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        sigma = (4 * c_noise).exp()
        c_skip, c_out, c_in, _ = (c.reshape(-1, 1, 1, 1) for c in edm.preconditioning(sigma))
        x = scaled_x / c_in
        best = mu + s**2 / (s**2 + sigma.reshape(-1, 1, 1, 1) ** 2) * (x - mu)
        return (best - c_skip * x) / c_out

    return model_fn


def run(sampler="heun", steps=25, seed=0, edm=None, **kwargs):
    edm = edm or ElucidatedDiffusion()
    return sample(edm, oracle(edm), SHAPE, sampler=sampler, steps=steps,
                  generator=torch.Generator().manual_seed(seed), **kwargs)


def test_preconditioning_gives_unit_variance_inputs_and_targets():
    """The paper's design goal: for data of std sigma_data, the network's input c_in x and its
    training target (x0 - c_skip x) / c_out have unit variance at every noise level."""
    edm = ElucidatedDiffusion(sigma_data=0.5)
    generator = torch.Generator().manual_seed(0)
    x0 = 0.5 * torch.randn(20000, generator=generator)
    for level in (0.01, 0.3, 2.0, 50.0):
        sigma = torch.full((20000,), level)
        c_skip, c_out, c_in, c_noise = edm.preconditioning(sigma)
        x = x0 + sigma * torch.randn(20000, generator=generator)
        assert (c_in * x).var().item() == pytest.approx(1.0, rel=0.05)
        assert ((x0 - c_skip * x) / c_out).var().item() == pytest.approx(1.0, rel=0.05)
        assert torch.allclose(c_noise, torch.full((20000,), math.log(level) / 4))


def test_loss_is_the_lambda_weighted_denoising_error_at_log_normal_levels():
    edm = ElucidatedDiffusion(p_mean=-1.2, p_std=1.2)
    x0 = torch.rand(4096, 1, 2, 2) * 2 - 1

    def model(x, c_noise, **cond):  # any network: the identity holds for every F
        return torch.tanh(x * 0.7 + c_noise.reshape(-1, 1, 1, 1))

    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    losses = edm.training_losses(model, x0, noise=noise, generator=torch.Generator().manual_seed(0))
    sigma = losses["sigma"]
    denoised = edm.denoise(model, x0 + sigma.reshape(-1, 1, 1, 1) * noise, sigma)
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    assert torch.allclose(losses["loss"], weight * (denoised - x0).pow(2).flatten(1).mean(1), rtol=1e-4)
    assert sigma.log().mean().item() == pytest.approx(-1.2, abs=0.06)
    assert sigma.log().std().item() == pytest.approx(1.2, rel=0.05)
    shares = torch.bincount(losses["noise_quartile"], minlength=4) / 4096
    assert torch.allclose(shares, torch.full((4,), 0.25), atol=0.03)  # quartiles of the training levels
    assert (sigma[losses["noise_quartile"] == 0].max() < sigma[losses["noise_quartile"] == 3].min())


def test_noise_levels_follow_the_rho_schedule():
    edm = ElucidatedDiffusion(sigma_min=0.002, sigma_max=80.0, rho=7.0)
    levels = edm.sigmas(5)
    assert levels.shape == (6,) and levels[0] == pytest.approx(80.0) and levels[4] == pytest.approx(0.002)
    assert levels[5] == 0 and bool((levels[1:] < levels[:-1]).all())
    middle = ((80 ** (1 / 7) + 0.002 ** (1 / 7)) / 2) ** 7
    assert levels[2].item() == pytest.approx(middle)
    assert edm.sigmas(1).tolist() == [80.0, 0.0]


@pytest.mark.parametrize("sampler, steps", [("heun", 50), ("heun_stochastic", 100)])
def test_samplers_driven_by_the_oracle_reproduce_the_data(sampler, steps):
    """Given a perfect network, churn only adds discretisation error (std +7.8% at 25 steps,
    +3.1% at 50, +1.4% at 100 with the paper's s_churn 40), so the stochastic sampler needs more steps."""
    x = run(sampler, steps=steps)
    assert abs(x.mean().item() - MU) < 0.02
    assert abs(x.std().item() / S - 1) < 0.02


def test_heun_converges_at_second_order():
    """Same starting noise, more steps: the deterministic sampler's distance to a fine solution
    shrinks about 4x per doubling (second order), far faster than first order would."""
    edm = ElucidatedDiffusion()
    start = 80.0 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    results = {steps: sample(edm, oracle(edm), SHAPE, steps=steps, noise=start) for steps in (8, 16, 160)}
    error_8 = (results[8] - results[160]).abs().mean()
    error_16 = (results[16] - results[160]).abs().mean()
    assert error_16 < error_8 / 3


def test_heun_is_deterministic_and_the_stochastic_sampler_is_seeded():
    edm = ElucidatedDiffusion()
    start = 80.0 * torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    first = sample(edm, oracle(edm), SHAPE, sampler="heun", steps=6, noise=start,
                   generator=torch.Generator().manual_seed(1))
    second = sample(edm, oracle(edm), SHAPE, sampler="heun", steps=6, noise=start,
                    generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, second)
    assert torch.equal(run("heun_stochastic", 6, seed=3), run("heun_stochastic", 6, seed=3))
    churned = sample(edm, oracle(edm), SHAPE, sampler="heun_stochastic", steps=6, noise=start,
                     generator=torch.Generator().manual_seed(1))
    assert not torch.allclose(churned, first)
    # s_churn 0 turns the stochastic sampler into the deterministic one.
    still = ElucidatedDiffusion(s_churn=0.0)
    assert torch.equal(sample(still, oracle(still), SHAPE, sampler="heun_stochastic", steps=6, noise=start), first)


def test_image_to_image_runs_the_last_steps_from_the_noised_input():
    init = torch.full(SHAPE, -0.8)
    assert torch.equal(run(init=init, strength=0.0), init)
    assert torch.equal(run(init=init, strength=1.0, seed=4), run(seed=4))
    edited = run(init=init, strength=0.2, steps=25)  # starts at a small noise level: stays near the input
    assert abs(edited.mean().item() - (-0.8)) < abs(edited.mean().item() - MU)
    with pytest.raises(ValueError, match="strength"):
        run(init=init, strength=1.5)


def test_inpainting_keeps_the_known_region_and_draws_the_rest():
    image = torch.full(SHAPE, -0.9)
    keep = torch.zeros(SHAPE[0], 1, 4, 4)
    keep[..., :2, :] = 1
    x = run(inpaint=Inpainting(image, keep))
    assert torch.equal(x[..., :2, :], image[..., :2, :])
    drawn = x[..., 2:, :]
    assert abs(drawn.mean().item() - MU) < 0.03 and abs(drawn.std().item() / S - 1) < 0.05
    with pytest.raises(ValueError, match="resampling"):
        run(inpaint=Inpainting(image, keep, resample=2))


def test_guidance_extrapolates_the_denoiser():
    """D is affine in F with shared coefficients, so guiding the network guides D."""
    edm = ElucidatedDiffusion()

    def network(x, c_noise, *, text_emb, text_mask, drop_text):
        return torch.where(drop_text.reshape(-1, 1, 1, 1), -x, x + text_emb.reshape(-1, 1, 1, 1))

    x = torch.randn(6, 1, 4, 4)
    sigma = torch.tensor([0.1, 0.5, 1.0, 2.0, 10.0, 50.0])
    cond = {"text_emb": torch.randn(6, 1, 1), "text_mask": torch.ones(6, 1, dtype=torch.bool)}
    guided = edm.denoise(ClassifierFreeGuidance(network, 4.0), x, sigma, **cond)
    conditional = edm.denoise(ClassifierFreeGuidance(network, 1.0), x, sigma, **cond)
    unconditional = edm.denoise(ClassifierFreeGuidance(network, 0.0), x, sigma, **cond)
    assert torch.allclose(guided, 4.0 * conditional - 3.0 * unconditional, atol=1e-5)
    assert not torch.allclose(guided, conditional)


def test_dynamic_thresholding_keeps_every_prediction_in_range():
    edm = ElucidatedDiffusion()
    edm_oracle = oracle(edm, mu=1.5)
    wild = sample(edm, edm_oracle, SHAPE, steps=10, generator=torch.Generator().manual_seed(0))
    assert wild.mean().item() == pytest.approx(1.5, abs=0.02)  # the data lies outside [-1, 1]...
    predictions = []
    tamed = sample(edm, edm_oracle, SHAPE, steps=10, generator=torch.Generator().manual_seed(0),
                   thresholding={"mode": "dynamic", "percentile": 99.5},
                   on_step=lambda step: predictions.append(step.pred_x0))
    assert tamed.abs().max() <= 1.0 + 1e-6  # ...and thresholding brings every step's x0 back
    assert len(predictions) == 10 and all(p.abs().max() <= 1.0 + 1e-6 for p in predictions)
    static = sample(edm, edm_oracle, SHAPE, steps=10, generator=torch.Generator().manual_seed(0),
                    thresholding={"mode": "static"})
    assert not torch.allclose(static, tamed)


def test_sampler_names_agree_with_the_modules():
    assert SAMPLERS["ddpm"] == tuple(samplers.SAMPLERS) and SAMPLERS["edm"] == tuple(elucidated.SAMPLERS)


def edm_sr_config(**super_resolution):
    """An 8 -> 16 Efficient U-Net stage under the EDM formulation."""
    return stage_config_from_dict({
        "unet": {"type": "efficient_unet", "image_size": 16, "base_channels": 16, "channel_mults": [1, 2],
                 "num_res_blocks": [1, 1], "num_head_channels": 16},
        "diffusion": {"formulation": "edm"}, "sampling": {"sampler": "heun", "steps": 3},
        "super_resolution": {"low_res_size": 8, **super_resolution}})


class Recorder(torch.nn.Module):
    def __init__(self, network):
        super().__init__()
        self.network, self.calls = network, []

    def forward(self, x, t, **cond):
        self.calls.append({"t": t.clone(), **{k: v.clone() if torch.is_tensor(v) else v for k, v in cond.items()}})
        return self.network(x, t, **cond)


def test_a_super_resolution_stage_augments_with_the_variance_preserving_process():
    config = edm_sr_config(train_aug_range=[0.5, 0.5], sample_aug_level=0.3)
    recorder = Recorder(build_network(config, 24))
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    text = EncodedText(torch.randn(4, 5, 24), torch.ones(4, 5, dtype=torch.bool))
    diffusion = build_diffusion(config)
    assert isinstance(diffusion, ElucidatedDiffusion)
    losses = training_losses(recorder, diffusion, config, images, text, generator=torch.Generator().manual_seed(0))
    assert losses["loss"].shape == (4,) and bool(torch.isfinite(losses["loss"]).all())
    call = recorder.calls[-1]
    assert torch.equal(call["aug_level"], torch.full((4,), round(0.5 * 999) / 999))
    # The low-res input carries the forward process's noise at that level: its signal is scaled
    # by sqrt(alpha-bar) of the schedule, as under the ddpm formulation.
    alpha_bar = float(build_augmentation_process(config).alphas_cumprod[round(0.5 * 999)])
    clean = downsample(images, 8)
    residual = call["low_res"] - alpha_bar**0.5 * clean
    assert residual.std().item() == pytest.approx((1 - alpha_bar) ** 0.5, rel=0.2)
    # The network is told ln(sigma) / 4 of the log-normal training levels, not a timestep.
    assert torch.allclose(call["t"], losses["sigma"].log() / 4)

    recorder.calls.clear()
    out = sample_stage(recorder.eval(), diffusion, config, text, low_res=clean, guidance=3.0,
                       generator=torch.Generator().manual_seed(0))
    assert out.shape == (4, 1, 16, 16) and out.abs().max() <= 1
    assert len(recorder.calls) == 5  # heun, 3 steps: 2 + 2 + 1 evaluations
    assert torch.allclose(recorder.calls[0]["t"], torch.full((8,), math.log(80.0) / 4))  # sigma_max first
    for call in recorder.calls:
        assert torch.equal(call["aug_level"], torch.full((8,), round(0.3 * 999) / 999))
        assert torch.equal(call["low_res"], recorder.calls[0]["low_res"])


def test_the_formulation_is_validated(tiny_stage):
    with pytest.raises(ConfigError, match="sampling.sampler.*heun, heun_stochastic"):
        stage_config_from_dict({"diffusion": {"formulation": "edm"}})
    with pytest.raises(ConfigError, match="sampling.sampler.*dpmpp_2m_sde"):
        stage_config_from_dict({"sampling": {"sampler": "heun"}})
    with pytest.raises(ConfigError, match="min_snr_gamma"):
        stage_config_from_dict({"diffusion": {"formulation": "edm", "min_snr_gamma": 5.0},
                                "sampling": {"sampler": "heun"}})
    with pytest.raises(ConfigError, match="diffusion.edm.sigma_max"):
        stage_config_from_dict({"diffusion": {"formulation": "edm", "edm": {"sigma_max": 0.001}},
                                "sampling": {"sampler": "heun"}})
    with pytest.raises(ConfigError, match="diffusion.edm.p_std"):
        stage_config_from_dict({"diffusion": {"formulation": "edm", "edm": {"p_std": 0}},
                                "sampling": {"sampler": "heun"}})
    # A sampler of the other formulation is refused at sampling time too, by name.
    config = tiny_stage()
    text = EncodedText(torch.randn(1, 8, 32), torch.ones(1, 8, dtype=torch.bool))
    with pytest.raises(ImagenError, match="'heun' does not sample the ddpm formulation"):
        sample_stage(build_network(config, 32), build_diffusion(config), config, text, sampler="heun")


def test_an_edm_stage_trains_resumes_and_samples(tiny_stage, trained, tmp_path):
    config = tiny_stage(sample_every=2)
    config.diffusion.formulation, config.sampling.sampler = "edm", "heun_stochastic"
    trainer = Trainer.from_config(config, tmp_path / "run")
    trainer.train()
    assert latest_checkpoint(tmp_path / "run").name == "step_00000002"
    assert (tmp_path / "run" / "samples" / "step_00000002.png").is_file()
    config = tiny_stage(sample_every=2, max_steps=3)
    config.diffusion.formulation, config.sampling.sampler = "edm", "heun_stochastic"
    resumed = Trainer.from_config(config, tmp_path / "run", resume=True)
    assert isinstance(resumed.diffusion, ElucidatedDiffusion) and resumed.step == 2

    # An EDM base stage feeds a ddpm super-resolution stage; editing and inpainting run through it.
    cascade = Cascade.from_checkpoints([tmp_path / "run", trained / "sr"])
    out = cascade.sample(["seven", "2"], steps=[2, 2], seed=0)
    assert out.images.shape == (2, 1, 32, 32) and out.stages[0].shape == (2, 1, 16, 16)
    assert torch.equal(cascade.sample(["seven", "2"], steps=[2, 2], seed=0).images, out.images)
    init = torch.full((2, 1, 16, 16), -1.0)
    kept = cascade.sample(["seven", "2"], steps=[4, 2], seed=0, init_images=init, strength=0.0)
    assert torch.equal(kept.stages[0], init)
    masks = torch.zeros(2, 1, 32, 32)
    masks[..., 16:, :] = 1
    half = torch.rand(2, 1, 32, 32) * 2 - 1
    painted = cascade.sample(["seven", "2"], steps=[2, 2], seed=0, inpaint_images=half, inpaint_masks=masks)
    assert torch.allclose(painted.images[..., :16, :], half[..., :16, :], atol=1e-6)
