"""Samplers checked against an exact oracle.

For data x0 ~ N(mu, sigma^2 I) the optimal network is known in closed form:
E[eps | x_t] = sqrt(1 - ab_t) (x_t - sqrt(ab_t) mu) / (ab_t sigma^2 + 1 - ab_t).
A correct sampler driven by it must return samples with mean mu and std
sigma; sign, indexing and respacing errors show up as wrong statistics.
"""

import pytest
import torch

from imagen.diffusion import GaussianDiffusion
from imagen.samplers import (
    SamplerStep,
    ddim_sample_loop,
    ddpm_sample_loop,
    dpm_solver_pp_2m_sample_loop,
    dpm_solver_pp_2m_sde_sample_loop,
    sample,
)
from imagen.schedules import make_betas, respaced_timesteps

MU, SIGMA = 0.3, 0.5
# 32768 independent values: standard errors 0.003 on the mean, 0.4% on the std. (Not
# more: larger tensors make torch split elementwise ops across threads, which is slow
# on a small shared CPU.)
SHAPE = (2048, 1, 4, 4)


def gaussian_oracle(objective: str, schedule: str = "cosine", mu: float = MU, sigma: float = SIGMA):
    """Optimal model_fn(x_t, t) for N(mu, sigma^2) data; t are ORIGINAL timesteps of 1000."""
    alphas_cumprod = torch.cumprod(1 - make_betas(schedule, 1000), 0)

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        ab = alphas_cumprod[t].to(x_t.dtype).reshape(-1, 1, 1, 1)
        eps = (1 - ab).sqrt() * (x_t - ab.sqrt() * mu) / (ab * sigma**2 + 1 - ab)
        if objective == "eps":
            return eps
        x0 = (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()
        return ab.sqrt() * eps - (1 - ab).sqrt() * x0

    return model_fn


def run_oracle(sampler: str, steps: int | None, objective: str = "eps", schedule: str = "cosine",
               seed: int = 0, **kwargs) -> torch.Tensor:
    diffusion = GaussianDiffusion.from_schedule(schedule, 1000, objective=objective)
    return sample(diffusion, gaussian_oracle(objective, schedule), SHAPE, sampler=sampler,
                  steps=steps, generator=torch.Generator().manual_seed(seed), **kwargs)


def assert_matches_data(x: torch.Tensor, std_tolerance: float) -> None:
    assert abs(x.mean().item() - MU) < 0.02
    assert abs(x.std().item() / SIGMA - 1) < std_tolerance


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_ddpm_over_all_1000_steps_reproduces_the_data(schedule):
    assert_matches_data(run_oracle("ddpm", None, schedule=schedule), std_tolerance=0.02)


# Ancestral sampling with the posterior variance leaves out Var[x0 | x_t] from
# the true reverse-step variance; with few steps that term is not negligible,
# so respaced DDPM slightly under-disperses (cosine, sigma = 0.5: std -3.9% at
# 100 steps, -7.1% at 50). The mean must still be right, the std close.
@pytest.mark.parametrize("objective", ["eps", "v"])
@pytest.mark.parametrize(("steps", "std_tolerance"), [(100, 0.05), (50, 0.08)])
def test_respaced_ddpm_reproduces_the_data(objective, steps, std_tolerance):
    x = run_oracle("ddpm", steps, objective)
    assert_matches_data(x, std_tolerance)
    assert x.std().item() < SIGMA  # under- never over-dispersed


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_ddim_deterministic_reproduces_the_data(objective):
    assert_matches_data(run_oracle("ddim", 100, objective, eta=0.0), std_tolerance=0.03)


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_dpm_solver_pp_2m_reproduces_the_data_in_20_steps(objective):
    assert_matches_data(run_oracle("dpmpp_2m", 20, objective), std_tolerance=0.015)


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_sde_dpm_solver_pp_2m_reproduces_the_data_where_ancestral_under_disperses(objective):
    """The second-order correction removes most of respaced DDPM's variance loss
    (cosine, 50 steps: std +1.1% against -7.0%; 25 steps: +2.9% against -11.7%)."""
    for steps, tolerance in ((50, 0.02), (25, 0.04)):
        x = run_oracle("dpmpp_2m_sde", steps, objective)
        assert_matches_data(x, std_tolerance=tolerance)
        ddpm_error = abs(run_oracle("ddpm", steps, objective).std().item() / SIGMA - 1)
        assert abs(x.std().item() / SIGMA - 1) < ddpm_error / 2


def test_first_order_sde_dpm_solver_pp_is_ancestral_sampling():
    """With 3 steps every update is first order (no history, then the step onto t = 0), and
    the first-order SDE update has the posterior's mean and variance: it is DDPM, draw for
    draw. With 50 steps the second-order term makes it differ."""
    torch.testing.assert_close(run_oracle("dpmpp_2m_sde", 3, seed=1), run_oracle("ddpm", 3, seed=1),
                               rtol=0, atol=1e-5)
    assert (run_oracle("dpmpp_2m_sde", 50, seed=1) - run_oracle("ddpm", 50, seed=1)).abs().max() > 0.1


def test_ddim_with_eta_one_is_ancestral_sampling():
    """DDIM's sigma at eta = 1 is the posterior std, so with the same noise draws it is DDPM."""
    ddpm = run_oracle("ddpm", 50, seed=1)
    ddim = run_oracle("ddim", 50, seed=1, eta=1.0)
    torch.testing.assert_close(ddim, ddpm, rtol=0, atol=1e-4)
    assert_matches_data(run_oracle("ddim", 50, seed=1, eta=0.5), std_tolerance=0.06)


def test_more_steps_bring_every_sampler_closer_to_the_data():
    for sampler in ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde"):
        errors = [abs(run_oracle(sampler, steps).std().item() / SIGMA - 1)
                  for steps in (10, 30, 200)]
        assert errors[0] > errors[1] > errors[2], (sampler, errors)


# -- mechanics -----------------------------------------------------------------------------

LOOPS = {
    "ddpm": ddpm_sample_loop,
    "ddim": ddim_sample_loop,
    "dpmpp_2m": dpm_solver_pp_2m_sample_loop,
    "dpmpp_2m_sde": dpm_solver_pp_2m_sde_sample_loop,
}


@pytest.mark.parametrize("sampler", list(LOOPS))
def test_yielded_steps_follow_the_respaced_timesteps_and_end_in_the_sample(sampler):
    diffusion = GaussianDiffusion.from_schedule("cosine", 1000).respace(25)
    oracle = gaussian_oracle("eps")
    seen_t = []

    def recording_model(x_t, t):
        assert not torch.is_grad_enabled()  # sampling builds no autograd graph
        seen_t.append(t)
        return oracle(x_t, t)

    extra = {"eta": 0.5} if sampler == "ddim" else {}
    steps = list(LOOPS[sampler](diffusion, recording_model, (8, 1, 2, 2),
                                generator=torch.Generator().manual_seed(2), **extra))
    assert len(steps) == 25 and all(isinstance(step, SamplerStep) for step in steps)
    expected_t = respaced_timesteps(1000, 25).flip(0).tolist()
    assert [step.t for step in steps] == expected_t  # decreasing, original timesteps
    assert [t.tolist() for t in seen_t] == [[t] * 8 for t in expected_t]
    final = sample(diffusion, oracle, (8, 1, 2, 2), sampler=sampler,
                   generator=torch.Generator().manual_seed(2), **extra)
    assert torch.equal(steps[-1].x, final)
    # The last step lands on the clean-data prediction: no noise is added at t = 0.
    torch.testing.assert_close(steps[-1].x, steps[-1].pred_x0)


@pytest.mark.parametrize("sampler", list(LOOPS))
def test_same_seed_same_samples_different_seed_different_samples(sampler):
    diffusion = GaussianDiffusion.from_schedule("linear", 1000)
    extra = {"eta": 0.5} if sampler == "ddim" else {}

    def draw(seed: int) -> torch.Tensor:
        return sample(diffusion, gaussian_oracle("eps", "linear"), (4, 1, 3, 3), sampler=sampler,
                      steps=20, generator=torch.Generator().manual_seed(seed), **extra)

    assert torch.equal(draw(3), draw(3))
    assert not torch.allclose(draw(3), draw(4))


@pytest.mark.parametrize("sampler", ["ddim", "dpmpp_2m"])
def test_deterministic_samplers_depend_only_on_the_initial_noise(sampler):
    diffusion = GaussianDiffusion.from_schedule("cosine", 1000)
    x_T = torch.randn(4, 1, 3, 3, generator=torch.Generator().manual_seed(5))
    outs = [sample(diffusion, gaussian_oracle("eps"), (4, 1, 3, 3), sampler=sampler, steps=10,
                   noise=x_T, generator=torch.Generator().manual_seed(seed)) for seed in (6, 7)]
    assert torch.equal(outs[0], outs[1])
    with pytest.raises(ValueError, match="initial noise"):
        sample(diffusion, gaussian_oracle("eps"), (4, 1, 2, 2), sampler=sampler, noise=x_T)


@pytest.mark.parametrize("sampler", list(LOOPS))
def test_thresholding_is_applied_to_every_x0_prediction(sampler):
    # Data far outside [-1, 1]: without thresholding the samples leave the range.
    diffusion = GaussianDiffusion.from_schedule("cosine", 1000).respace(10)
    wide = gaussian_oracle("eps", mu=0.0, sigma=3.0)
    unthresholded = sample(diffusion, wide, (16, 1, 4, 4), sampler=sampler,
                           generator=torch.Generator().manual_seed(8))
    assert unthresholded.abs().max() > 3

    for thresholding in ({"mode": "static"}, {"mode": "dynamic", "percentile": 95.0}):
        steps = list(LOOPS[sampler](diffusion, wide, (16, 1, 4, 4), thresholding=thresholding,
                                    generator=torch.Generator().manual_seed(8)))
        assert all(step.pred_x0.abs().max() <= 1 for step in steps)
        assert steps[-1].x.abs().max() <= 1

    calls = []

    def counting_clip(x0):
        calls.append(x0.shape)
        return x0.clamp(-1, 1)

    list(LOOPS[sampler](diffusion, wide, (16, 1, 4, 4), thresholding=counting_clip))
    assert len(calls) == 10


def test_sample_rejects_unknown_names_and_misplaced_eta():
    diffusion = GaussianDiffusion.from_schedule("cosine", 100)
    with pytest.raises(ValueError, match=r"unknown sampler 'euler'.*'ddpm', 'ddim', 'dpmpp_2m', 'dpmpp_2m_sde'"):
        sample(diffusion, gaussian_oracle("eps"), (1, 1, 2, 2), sampler="euler")
    with pytest.raises(TypeError, match="eta"):  # options go to the sampler's loop, which names what it takes
        sample(diffusion, gaussian_oracle("eps"), (1, 1, 2, 2), sampler="ddpm", eta=0.5)
    with pytest.raises(ValueError, match="eta"):
        next(ddim_sample_loop(diffusion, gaussian_oracle("eps"), (1, 1, 2, 2), eta=1.5))


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde"])
def test_image_to_image_ends_at_the_data_and_its_ends_are_sampling_and_the_input(sampler):
    """SDEdit from data samples: noising them to the level the strength picks and running the
    rest of the (respaced) chain must give the data distribution again, closer to the input the
    lower the strength. Strength 1 is sampling from noise, strength 0 the input itself."""
    init = MU + SIGMA * torch.randn(SHAPE, generator=torch.Generator().manual_seed(7))
    calls = []
    edited = {strength: run_oracle(sampler, 50, init=init, strength=strength, seed=1,
                                   on_step=lambda step: calls.append(step.t))
              for strength in (0.3, 0.6)}
    assert len(calls) == 15 + 30  # round(strength * 50) network evaluations each
    assert calls[0] == max(respaced_timesteps(1000, 50)[:15]) and calls[15] == max(respaced_timesteps(1000, 50)[:30])
    for x in edited.values():  # ancestral DDPM loses some variance in 50 steps, also from noise
        assert_matches_data(x, std_tolerance=0.08 if sampler == "ddpm" else 0.05)
    correlation = {s: torch.corrcoef(torch.stack([x.flatten(), init.flatten()]))[0, 1] for s, x in edited.items()}
    assert correlation[0.3] > correlation[0.6] > 0.1
    assert torch.equal(run_oracle(sampler, 50, init=init, strength=1.0, seed=3), run_oracle(sampler, 50, seed=3))
    assert torch.equal(run_oracle(sampler, 50, init=init, strength=0.0, seed=3), init)
    with pytest.raises(ValueError, match="strength"):
        run_oracle(sampler, 50, init=init, strength=1.5)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp_2m", "dpmpp_2m_sde"])
def test_inpainting_keeps_the_known_region_and_samples_the_rest(sampler):
    from imagen.samplers import Inpainting

    image = MU + SIGMA * torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    keep = torch.zeros(1, 1, 4, 4)
    keep[..., :2] = 1.0  # the left half is known
    result = run_oracle(sampler, 50, inpaint=Inpainting(image, keep))
    assert torch.equal(result[..., :2], image[..., :2])
    drawn = result[..., 2:]
    assert abs(drawn.mean().item() - MU) < 0.02 and abs(drawn.std().item() / SIGMA - 1) < 0.1
    assert torch.corrcoef(torch.stack([drawn.flatten(), image[..., 2:].flatten()]))[0, 1].abs() < 0.05


def test_inpainting_resamples_each_step_with_the_ancestral_sampler():
    from imagen.samplers import Inpainting

    image = MU + SIGMA * torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    keep = torch.zeros(1, 1, 4, 4)
    keep[..., :2] = 1.0
    calls = []
    result = run_oracle("ddpm", 20, inpaint=Inpainting(image, keep, resample=3), on_step=calls.append)
    assert torch.equal(result[..., :2], image[..., :2]) and len(calls) == 20  # one yielded step per timestep
    evaluations = []
    diffusion = GaussianDiffusion.from_schedule("cosine", 1000)
    oracle = gaussian_oracle("eps")
    sample(diffusion, lambda x, t: evaluations.append(1) or oracle(x, t), SHAPE, sampler="ddpm", steps=20,
           generator=torch.Generator().manual_seed(0), inpaint=Inpainting(image, keep, resample=3))
    assert len(evaluations) == 19 * 3 + 1  # every step three times, the last once
    with pytest.raises(ValueError, match="resampling runs the ancestral sampler"):
        run_oracle("ddim", 20, inpaint=Inpainting(image, keep, resample=3))
