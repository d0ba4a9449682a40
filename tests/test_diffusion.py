import math

import pytest
import torch

from imagen.diffusion import GaussianDiffusion, threshold_x0
from imagen.schedules import make_betas, respaced_timesteps


def alpha_bars(betas: torch.Tensor) -> list[float]:
    """alpha-bar computed independently of GaussianDiffusion, in Python floats."""
    out, running = [], 1.0
    for beta in betas.tolist():
        running *= 1 - beta
        out.append(running)
    return out


# -- forward process ---------------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["cosine", "linear"])
def test_q_sample_marginals_match_the_schedule(schedule):
    diffusion = GaussianDiffusion.from_schedule(schedule, 1000)
    ab = alpha_bars(diffusion.betas)
    g = torch.Generator().manual_seed(0)
    mu, sigma, n = 0.6, 0.4, 100_000
    t = torch.tensor([0, 100, 500, 900, 999])
    x0 = mu + sigma * torch.randn(len(t), n, generator=g, dtype=torch.float64)
    noise = torch.randn(len(t), n, generator=g, dtype=torch.float64)
    x_t = diffusion.q_sample(x0, t, noise)  # row i is at timestep t[i]
    for row, step in enumerate(t.tolist()):
        expected_mean = math.sqrt(ab[step]) * mu
        expected_var = ab[step] * sigma**2 + 1 - ab[step]
        assert x_t[row].mean().item() == pytest.approx(expected_mean, abs=0.01)
        assert x_t[row].var().item() == pytest.approx(expected_var, rel=0.02)


def test_posterior_matches_bayes_rule_on_gaussians():
    diffusion = GaussianDiffusion.from_schedule("cosine", 1000)
    betas = diffusion.betas.tolist()
    ab = alpha_bars(diffusion.betas)
    g = torch.Generator().manual_seed(1)
    t = torch.tensor([1, 10, 300, 700, 999])
    x0 = torch.randn(len(t), 3, 4, 4, generator=g, dtype=torch.float64)
    x_t = torch.randn(len(t), 3, 4, 4, generator=g, dtype=torch.float64)
    mean, variance = diffusion.q_posterior_mean_variance(x0, x_t, t)
    assert variance.shape == (len(t), 1, 1, 1)
    for row, step in enumerate(t.tolist()):
        # Prior q(x_{t-1} | x0) = N(sqrt(ab_{t-1}) x0, 1 - ab_{t-1});
        # likelihood q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t).
        prior_var = 1 - ab[step - 1]
        precision = 1 / prior_var + (1 - betas[step]) / betas[step]
        bayes_mean = (math.sqrt(ab[step - 1]) * x0[row] / prior_var
                      + math.sqrt(1 - betas[step]) * x_t[row] / betas[step]) / precision
        assert variance[row].item() == pytest.approx(1 / precision, rel=1e-9)
        assert variance[row].item() == pytest.approx(
            betas[step] * (1 - ab[step - 1]) / (1 - ab[step]), rel=1e-9)
        torch.testing.assert_close(mean[row], bayes_mean, rtol=1e-9, atol=1e-12)


def test_posterior_at_t0_is_the_clean_image():
    diffusion = GaussianDiffusion.from_schedule("linear", 1000)
    x0 = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    x_t = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    mean, variance = diffusion.q_posterior_mean_variance(x0, x_t, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(mean, x0)
    assert (variance == 0).all()


def test_posterior_sample_after_forward_sample_has_the_marginal_of_step_t_minus_1():
    diffusion = GaussianDiffusion.from_schedule("cosine", 1000)
    ab = alpha_bars(diffusion.betas)
    g = torch.Generator().manual_seed(2)
    n = 100_000
    x0 = torch.tensor([-0.8, 0.3, 1.0], dtype=torch.float64)[:, None].expand(3, n)
    for step in (5, 400, 950):
        t = torch.full((3,), step)
        x_t = diffusion.q_sample(x0, t, torch.randn(3, n, generator=g, dtype=torch.float64))
        mean, variance = diffusion.q_posterior_mean_variance(x0, x_t, t)
        x_prev = mean + variance.sqrt() * torch.randn(3, n, generator=g, dtype=torch.float64)
        expected_mean = math.sqrt(ab[step - 1]) * x0[:, 0]
        torch.testing.assert_close(x_prev.mean(1), expected_mean, atol=0.01, rtol=0)
        expected_var = torch.full((3,), 1 - ab[step - 1], dtype=torch.float64)
        torch.testing.assert_close(x_prev.var(1), expected_var, rtol=0.02, atol=1e-6)


# -- parameterisations -----------------------------------------------------------------


def test_eps_x0_v_conversions_round_trip():
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([0, 1, 250, 600, 999])
    x0 = torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 2, 4, 4, generator=g, dtype=torch.float64)
    eps_diffusion = GaussianDiffusion.from_schedule("cosine", 1000, objective="eps")
    v_diffusion = GaussianDiffusion.from_schedule("cosine", 1000, objective="v")
    x_t = eps_diffusion.q_sample(x0, t, eps)

    torch.testing.assert_close(eps_diffusion.x0_from_output(x_t, t, eps), x0, rtol=0, atol=1e-7)
    torch.testing.assert_close(eps_diffusion.eps_from_x0(x_t, t, x0), eps, rtol=0, atol=1e-8)
    v = v_diffusion.v_from_eps(x0, t, eps)
    torch.testing.assert_close(v_diffusion.x0_from_output(x_t, t, v), x0, rtol=0, atol=1e-10)

    ab = torch.tensor(alpha_bars(eps_diffusion.betas), dtype=torch.float64)[t].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(v, ab.sqrt() * eps - (1 - ab).sqrt() * x0)


def test_coefficients_are_cast_to_the_input_dtype():
    diffusion = GaussianDiffusion.from_schedule("cosine", 1000)
    x0 = torch.randn(2, 1, 4, 4)
    t = torch.tensor([3, 800])
    assert diffusion.q_sample(x0, t, torch.randn_like(x0)).dtype == torch.float32
    assert diffusion.q_sample(x0.half(), t, torch.randn_like(x0).half()).dtype == torch.float16


# -- respacing ---------------------------------------------------------------------------


def test_respace_keeps_alpha_bar_at_the_kept_original_timesteps():
    full = GaussianDiffusion.from_schedule("cosine", 1000, objective="v")
    short = full.respace(50)
    kept = respaced_timesteps(1000, 50)
    assert short.num_timesteps == 50 and short.objective == "v"
    assert torch.equal(short.timestep_map, kept)
    torch.testing.assert_close(short.alphas_cumprod, full.alphas_cumprod[kept], rtol=1e-9, atol=0)
    # So the forward process of the short chain lands on the same x_t.
    x0 = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    noise = torch.randn(3, 1, 2, 2, dtype=torch.float64)
    idx = torch.tensor([0, 17, 49])
    torch.testing.assert_close(short.q_sample(x0, idx, noise), full.q_sample(x0, kept[idx], noise))
    assert torch.equal(short.model_timesteps(idx), kept[idx])


def test_respacing_a_respaced_process_still_maps_to_original_timesteps():
    full = GaussianDiffusion.from_schedule("linear", 1000)
    twice = full.respace(100).respace(10)
    expected = respaced_timesteps(1000, 100)[respaced_timesteps(100, 10)]
    assert torch.equal(twice.timestep_map, expected)
    torch.testing.assert_close(twice.alphas_cumprod, full.alphas_cumprod[expected],
                               rtol=1e-9, atol=0)
    assert torch.equal(full.respace(1000).timestep_map, torch.arange(1000))


def test_invalid_construction_raises():
    with pytest.raises(ValueError, match="objective"):
        GaussianDiffusion(make_betas("cosine", 10), objective="x0")
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(torch.tensor([0.1, 1.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="betas"):
        GaussianDiffusion(torch.tensor([0.1, 1.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="steps"):
        GaussianDiffusion.from_schedule("cosine", 100).respace(101)
    with pytest.raises(ValueError, match="min_snr_gamma"):
        GaussianDiffusion.from_schedule("cosine", 100).min_snr_weight(torch.tensor([3]), 0.0)


# -- training loss -----------------------------------------------------------------------


@pytest.mark.parametrize("objective", ["eps", "v"])
def test_the_objectives_target_gives_zero_loss_and_the_model_gets_conditioning(objective):
    diffusion = GaussianDiffusion.from_schedule("cosine", 1000, objective=objective)
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(4, 1, 4, 4, generator=g)
    noise = torch.randn(4, 1, 4, 4, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    text_emb = torch.randn(4, 3, 8, generator=g)
    calls = []

    def oracle(x_t, timesteps, *, text_emb, drop_text):
        calls.append((timesteps, text_emb, drop_text))
        torch.testing.assert_close(x_t, diffusion.q_sample(x0, t, noise))
        return noise if objective == "eps" else diffusion.v_from_eps(x0, t, noise)

    drop = torch.tensor([True, False, False, True])
    out = diffusion.training_losses(oracle, x0, t, noise, text_emb=text_emb, drop_text=drop)
    assert torch.equal(out["loss"], torch.zeros(4)) and torch.equal(out["t"], t)
    (seen_t, seen_emb, seen_drop), = calls
    assert torch.equal(seen_t, t) and seen_emb is text_emb and seen_drop is drop

    wrong = diffusion.training_losses(lambda x, s, **_: torch.zeros_like(x), x0, t, noise)
    target = noise if objective == "eps" else diffusion.v_from_eps(x0, t, noise)
    torch.testing.assert_close(wrong["loss"], target.pow(2).mean(dim=(1, 2, 3)))


def test_training_losses_draw_timesteps_uniformly_and_reproducibly():
    diffusion = GaussianDiffusion.from_schedule("cosine", 20)
    x0 = torch.zeros(20_000, 1)

    def zero_model(x, t):
        return torch.zeros_like(x)

    first = diffusion.training_losses(zero_model, x0, generator=torch.Generator().manual_seed(5))
    again = diffusion.training_losses(zero_model, x0, generator=torch.Generator().manual_seed(5))
    other = diffusion.training_losses(zero_model, x0, generator=torch.Generator().manual_seed(6))
    assert torch.equal(first["t"], again["t"]) and torch.equal(first["loss"], again["loss"])
    assert not torch.equal(first["t"], other["t"])
    counts = torch.bincount(first["t"], minlength=20).double()
    assert counts.min() > 0
    assert (counts / 20_000 - 0.05).abs().max() < 0.006  # 1000 expected per step, sd ~31
    # Zero prediction of eps: loss is the noise energy, mean 1.
    assert first["loss"].mean().item() == pytest.approx(1.0, abs=0.03)


def test_min_snr_weighting_means_the_same_thing_for_both_objectives():
    """Weighted loss = min(snr, gamma) * ||x0_hat - x0||^2 whichever quantity is predicted."""
    gamma = 5.0
    g = torch.Generator().manual_seed(7)
    t = torch.tensor([0, 50, 200, 400, 700, 999])
    x0 = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    x0_hat = x0 + 0.3 * torch.randn(6, 1, 4, 4, generator=g, dtype=torch.float64)
    ab = torch.tensor(alpha_bars(make_betas("cosine", 1000)), dtype=torch.float64)[t]
    snr = ab / (1 - ab)
    expected = snr.clamp(max=gamma) * (x0_hat - x0).pow(2).mean(dim=(1, 2, 3))
    assert (snr > gamma).any() and (snr < gamma).any()

    for objective in ("eps", "v"):
        diffusion = GaussianDiffusion.from_schedule("cosine", 1000, objective=objective)

        def model_predicting_x0_hat(x_t, timesteps):
            eps_hat = diffusion.eps_from_x0(x_t, t, x0_hat)
            return eps_hat if objective == "eps" else diffusion.v_from_eps(x0_hat, t, eps_hat)

        out = diffusion.training_losses(model_predicting_x0_hat, x0, t, noise,
                                        min_snr_gamma=gamma)
        torch.testing.assert_close(out["loss"], expected, rtol=1e-6, atol=0)
        weight = snr.clamp(max=gamma) / (snr if objective == "eps" else snr + 1)
        torch.testing.assert_close(out["loss"], weight * out["mse"], rtol=1e-12, atol=0)


def test_training_losses_reject_a_prediction_of_the_wrong_shape():
    diffusion = GaussianDiffusion.from_schedule("cosine", 100)
    with pytest.raises(ValueError, match="shape"):
        diffusion.training_losses(lambda x, t: x[:, :1], torch.zeros(2, 3, 4, 4))


# -- thresholding ------------------------------------------------------------------------


def known_percentile_sample(scale: float) -> tuple[torch.Tensor, float]:
    """A (1, 1, 3, 67) sample whose |values| are scale * (1 + k/100), k = 0..200.

    torch.quantile interpolates linearly between order statistics; with 201
    values the 99.5th percentile sits exactly on the 200th smallest
    (position 0.995 * 200 = 199), i.e. scale * 2.99.
    """
    magnitudes = scale * (1 + torch.arange(201, dtype=torch.float64) / 100)
    signs = torch.where(torch.arange(201) % 3 == 0, -1.0, 1.0).double()
    permutation = torch.randperm(201, generator=torch.Generator().manual_seed(8))
    return (signs * magnitudes)[permutation].reshape(1, 1, 3, 67), scale * 2.99


def test_dynamic_threshold_divides_each_sample_by_its_own_percentile():
    first, s_first = known_percentile_sample(1.0)
    second, s_second = known_percentile_sample(4.0)
    x0 = torch.cat([first, second])
    out = threshold_x0(x0, "dynamic", percentile=99.5)
    expected = torch.cat([first.clamp(-s_first, s_first) / s_first,
                          second.clamp(-s_second, s_second) / s_second])
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert out.abs().max() == 1.0
    # Per sample, only the percentile value itself and the one value above it reach |1|.
    assert int((out.abs() == 1).sum()) == 4

    median_out = threshold_x0(first, "dynamic", percentile=50)
    torch.testing.assert_close(median_out, first.clamp(-2.0, 2.0) / 2.0, rtol=1e-12, atol=1e-12)


def test_dynamic_threshold_cap_limits_s():
    x0, _ = known_percentile_sample(1.0)
    out = threshold_x0(x0, "dynamic", max_threshold=1.5)
    torch.testing.assert_close(out, x0.clamp(-1.5, 1.5) / 1.5, rtol=1e-12, atol=1e-12)
    # A cap above the percentile changes nothing.
    torch.testing.assert_close(threshold_x0(x0, "dynamic", max_threshold=10.0),
                               threshold_x0(x0, "dynamic"))


def test_dynamic_threshold_is_a_plain_clip_when_the_percentile_is_below_one():
    g = torch.Generator().manual_seed(9)
    inside = torch.rand(1, 1, 20, 20, generator=g) * 1.8 - 0.9
    with_outlier = inside.clone()
    with_outlier[0, 0, 5, 5] = 7.0  # 1 of 400 values: above the 99.5th percentile
    x0 = torch.cat([inside, with_outlier])
    out = threshold_x0(x0, "dynamic")
    assert torch.equal(out[0], inside[0])
    assert torch.equal(out[1], with_outlier[0].clamp(-1, 1))
    assert out[1, 0, 5, 5] == 1.0


def test_dynamic_threshold_output_stays_in_range_for_wild_inputs():
    g = torch.Generator().manual_seed(10)
    x0 = torch.randn(8, 3, 8, 8, generator=g) * torch.logspace(-1, 2, 8).reshape(8, 1, 1, 1)
    out = threshold_x0(x0, "dynamic")
    assert out.abs().max() <= 1.0
    assert out.dtype == x0.dtype
    # Rescaling keeps the sign and order of values within a sample.
    assert torch.equal(torch.sign(out), torch.sign(x0))
    assert threshold_x0(x0.bfloat16(), "dynamic").dtype == torch.bfloat16


def test_static_threshold_is_a_clip_and_none_is_the_identity():
    x0 = torch.linspace(-3, 3, 25).reshape(1, 1, 5, 5)
    assert torch.equal(threshold_x0(x0, "static"), x0.clamp(-1, 1))
    assert torch.equal(threshold_x0(x0, "none"), x0)


def test_bad_threshold_arguments_raise():
    x0 = torch.zeros(1, 1, 2, 2)
    with pytest.raises(ValueError, match="unknown thresholding mode 'soft'"):
        threshold_x0(x0, "soft")
    with pytest.raises(ValueError, match="percentile"):
        threshold_x0(x0, "dynamic", percentile=0)
    with pytest.raises(ValueError, match="max_threshold"):
        threshold_x0(x0, "dynamic", max_threshold=0.5)
