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
from imagen.config import SAMPLERS_BY_FORMULATION, ConfigError, stage_config_from_dict
from imagen.elucidated import ElucidatedDiffusion, heun_sample_loop, sample
from imagen.errors import ImagenError
from imagen.guidance import ClassifierFreeGuidance
from imagen.samplers import Inpainting
from imagen.stage import augmentation_process, build_diffusion, build_network, sample_stage, training_losses
from imagen.super_resolution import downsample
from imagen.text import EncodedText
from imagen.trainer import Trainer, TrainingError

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


def identity(edm: ElucidatedDiffusion):
    """A network whose denoiser returns its input, D(x; sigma) = x: the ODE then stands still, so
    a sampler's result shows exactly the noise it added."""

    def model_fn(scaled_x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        c_skip, c_out, c_in, _ = (c.reshape(-1, 1, 1, 1) for c in edm.preconditioning((4 * c_noise).exp()))
        return (1 - c_skip) * (scaled_x / c_in) / c_out

    return model_fn


def flat_oracle(edm: ElucidatedDiffusion, pixels: int = 16):
    """The optimal network for images that are one value c ~ N(MU, S^2) everywhere: the denoiser
    reads c from the mean of all pixels, so a kept region decides what is drawn beside it."""

    def model_fn(scaled_x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        sigma = (4 * c_noise).exp().reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, _ = (c.reshape(-1, 1, 1, 1) for c in edm.preconditioning(sigma.flatten()))
        x = scaled_x / c_in
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        best = MU + S**2 / (S**2 + sigma**2 / pixels) * (mean - MU)
        return (best.expand_as(x) - c_skip * x) / c_out

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


def test_the_stochastic_step_adds_churn_noise_only_inside_its_range():
    """Algorithm 2: a level sigma in [s_tmin, s_tmax] is raised to sigma (1 + gamma) by noise of
    variance (sigma_hat^2 - sigma^2) s_noise^2, gamma = min(s_churn / N, sqrt(2) - 1)."""
    edm = ElucidatedDiffusion(s_tmin=0.05, s_tmax=50.0, s_noise=1.5)
    start = torch.zeros(SHAPE)

    def first_step(sigma, churn):
        loop = heun_sample_loop(edm, identity(edm), SHAPE, sigmas=torch.tensor([sigma, 0.0], dtype=torch.float64),
                                churn=churn, noise=start, generator=torch.Generator().manual_seed(0))
        return next(loop).x

    for churn in (0.1, math.sqrt(2) - 1):
        added = first_step(10.0, churn)
        expected = (10.0**2 * ((1 + churn) ** 2 - 1)) * 1.5**2
        assert added.var().item() == pytest.approx(expected, rel=0.03)
    assert torch.equal(first_step(60.0, 0.4), start)  # above s_tmax: no churn
    assert torch.equal(first_step(0.01, 0.4), start)  # below s_tmin
    assert torch.equal(first_step(10.0, 0.0), start)  # heun: none


def test_churn_is_capped_and_set_by_the_full_step_count():
    edm = ElucidatedDiffusion(s_churn=1000.0, s_tmin=0.0, s_tmax=1000.0, s_noise=1.0)
    start = torch.zeros(SHAPE)
    x = sample(edm, identity(edm), SHAPE, sampler="heun_stochastic", steps=1, noise=start,
               generator=torch.Generator().manual_seed(0))
    # One step at sigma_max = 80, gamma capped at sqrt(2) - 1 (not 1000): variance 80^2 (2 - 1).
    assert x.var().item() == pytest.approx(80.0**2, rel=0.03)
    mild = ElucidatedDiffusion(s_churn=2.0, s_tmin=0.0, s_tmax=1000.0, s_noise=1.0)
    init = torch.zeros(SHAPE)
    # An edit of 10 of 40 steps keeps gamma = 2 / 40, not 2 / 10; the start noise is tan(pi/8)
    # and each step then adds churn, so compare against the deterministic sampler's start alone.
    edited = sample(mild, identity(mild), SHAPE, sampler="heun_stochastic", steps=40, init=init, strength=0.25,
                    generator=torch.Generator().manual_seed(0))
    levels = mild.sigmas(10, start=math.tan(math.pi / 8))[:-1]
    gamma = 2.0 / 40
    expected = levels[0].item() ** 2 + sum(level.item() ** 2 * ((1 + gamma) ** 2 - 1) for level in levels)
    assert edited.var().item() == pytest.approx(expected, rel=0.03)


def test_image_to_image_starts_at_the_noise_level_of_its_strength():
    """The start noise is tan(strength pi / 2), the cosine schedule's level at that fraction of the
    diffusion: with a denoiser that returns its input, the result is the noised start itself."""
    edm = ElucidatedDiffusion()
    init = torch.full(SHAPE, 0.5)
    for strength in (0.2, 0.6):
        x = sample(edm, identity(edm), SHAPE, steps=25, init=init, strength=strength,
                   generator=torch.Generator().manual_seed(0))
        assert (x - init).mean().abs() < 0.02
        assert (x - init).std().item() == pytest.approx(math.tan(strength * math.pi / 2), rel=0.02)


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
    steps = []
    x = run(inpaint=Inpainting(image, keep), on_step=steps.append)
    assert torch.equal(x[..., :2, :], image[..., :2, :])
    # After each step the kept region is the image noised to the level the step reached.
    for step, level in zip(steps[:-1], ElucidatedDiffusion().sigmas(25)[1:-1]):
        noise = step.x[..., :2, :] - image[..., :2, :]
        assert noise.std().item() == pytest.approx(level.item(), rel=0.05)
    drawn = x[..., 2:, :]
    assert abs(drawn.mean().item() - MU) < 0.03 and abs(drawn.std().item() / S - 1) < 0.05
    with pytest.raises(ValueError, match="resampling"):
        run(inpaint=Inpainting(image, keep, resample=2))


def test_inpainting_draws_what_the_kept_region_implies():
    """Images are one value everywhere: keeping half of an image at -0.6 must make the drawn half
    -0.6 too, which needs the kept region noised to each step's own level."""
    edm = ElucidatedDiffusion()
    image = torch.full(SHAPE, -0.6)
    keep = torch.zeros(SHAPE[0], 1, 4, 4)
    keep[..., :2, :] = 1
    x = sample(edm, flat_oracle(edm), SHAPE, steps=25, inpaint=Inpainting(image, keep),
               generator=torch.Generator().manual_seed(0))
    drawn = x[..., 2:, :]
    assert abs(drawn.mean().item() + 0.6) < 0.03 and drawn.std().item() < 0.1
    free = sample(edm, flat_oracle(edm), SHAPE, steps=25, generator=torch.Generator().manual_seed(0))
    # Without the kept half: the data's distribution (2048 values, standard error 0.011).
    assert abs(free.mean().item() - MU) < 0.05 and free.std().item() == pytest.approx(S, rel=0.1)


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
    assert sorted(SAMPLERS_BY_FORMULATION["ddpm"]) == sorted(samplers.SAMPLERS)
    assert SAMPLERS_BY_FORMULATION["edm"] == elucidated.SAMPLERS


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
    alpha_bar = float(augmentation_process(diffusion, config).alphas_cumprod[round(0.5 * 999)])
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
    # An unset sampler is the formulation's default; a sampler of the other one is refused.
    assert stage_config_from_dict({"diffusion": {"formulation": "edm"}}).sampling.sampler == "heun"
    assert stage_config_from_dict({}).sampling.sampler == "dpmpp_2m_sde"
    with pytest.raises(ConfigError, match="sampling.sampler.*heun, heun_stochastic"):
        stage_config_from_dict({"diffusion": {"formulation": "edm"}, "sampling": {"sampler": "ddpm"}})
    with pytest.raises(ConfigError, match="sampling.sampler.*dpmpp_2m_sde"):
        stage_config_from_dict({"sampling": {"sampler": "heun"}})
    with pytest.raises(ConfigError, match="min_snr_gamma"):
        stage_config_from_dict({"diffusion": {"formulation": "edm", "min_snr_gamma": 5.0}})
    with pytest.raises(ConfigError, match="diffusion.objective"):
        stage_config_from_dict({"diffusion": {"formulation": "edm", "objective": "v"}})
    with pytest.raises(ConfigError, match="diffusion.edm.sigma_max"):
        stage_config_from_dict({"diffusion": {"formulation": "edm", "edm": {"sigma_max": 0.001}}})
    with pytest.raises(ConfigError, match="diffusion.edm.p_std"):
        stage_config_from_dict({"diffusion": {"formulation": "edm", "edm": {"p_std": 0}}})
    # A sampler of the other formulation is refused at sampling time too, by name.
    config = tiny_stage()
    text = EncodedText(torch.randn(1, 8, 32), torch.ones(1, 8, dtype=torch.bool))
    with pytest.raises(ImagenError, match="sampler heun: stage 0 was trained with the ddpm formulation"):
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


def test_resuming_with_another_formulation_is_refused(tiny_stage, tmp_path):
    config = tiny_stage()
    Trainer.from_config(config, tmp_path / "run").train()
    config = tiny_stage(max_steps=3)
    config.diffusion.formulation, config.sampling.sampler = "edm", "heun"
    with pytest.raises(TrainingError, match=r"diffusion.formulation \(ddpm -> edm\)"):
        Trainer.from_config(config, tmp_path / "run", resume=True)
