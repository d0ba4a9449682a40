import math

import pytest
import torch

from imagen.schedules import betas_for_alphas_cumprod, make_betas, respaced_timesteps


def test_cosine_alpha_bar_follows_the_closed_form_until_clipping():
    T, s = 1000, 0.008
    betas = make_betas("cosine", T)
    assert betas.dtype == torch.float64 and betas.shape == (T,)
    alphas_cumprod = torch.cumprod(1 - betas, 0)

    def f(u: float) -> float:
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    # alpha-bar after step t (0-based) is f((t+1)/T) / f(0); only the last few
    # steps are affected by the clip at 0.999.
    for t in (0, 1, 10, 250, 500, 900, 990):
        assert alphas_cumprod[t].item() == pytest.approx(f((t + 1) / T) / f(0), rel=1e-9)
    assert betas.max().item() == pytest.approx(0.999)
    assert (betas <= 0.999).all()
    assert (betas[1:] >= betas[:-1]).all(), "cosine betas increase with t"
    assert 0 < alphas_cumprod[-1] < 1e-6


def test_linear_schedule_is_scaled_for_1000_steps():
    betas = make_betas("linear", 1000)
    assert betas[0].item() == pytest.approx(1e-4)
    assert betas[-1].item() == pytest.approx(0.02)
    torch.testing.assert_close(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999,
                                                        dtype=torch.float64))
    # With 4000 steps each beta is 4x smaller, so the final log alpha-bar is about the same.
    long = make_betas("linear", 4000)
    assert long[0].item() == pytest.approx(0.25e-4)
    assert long[-1].item() == pytest.approx(0.005)
    log_ab_1000 = torch.log1p(-betas).sum().item()
    log_ab_4000 = torch.log1p(-long).sum().item()
    assert log_ab_4000 == pytest.approx(log_ab_1000, rel=0.01)
    custom = make_betas("linear", 1000, linear_start=1e-3, linear_end=0.01)
    assert (custom[0].item(), custom[-1].item()) == pytest.approx((1e-3, 0.01))


def test_bad_schedule_arguments_raise():
    with pytest.raises(ValueError, match="unknown noise schedule 'quadratic'"):
        make_betas("quadratic", 1000)
    with pytest.raises(ValueError, match="outside"):
        make_betas("linear", 10)  # 0.02 * 1000 / 10 = 2 is not a variance in (0, 1)
    with pytest.raises(ValueError):
        make_betas("cosine", 0)


def test_respaced_timesteps_are_evenly_spaced_and_keep_both_ends():
    kept = respaced_timesteps(1000, 50)
    assert kept.dtype == torch.long and len(kept) == 50
    assert kept[0] == 0 and kept[-1] == 999
    gaps = kept.diff()
    assert (gaps > 0).all()
    assert gaps.min() >= 20 and gaps.max() <= 21  # 999 / 49 = 20.39
    assert respaced_timesteps(1000, 4).tolist() == [0, 333, 666, 999]
    assert respaced_timesteps(10, 4).tolist() == [0, 3, 6, 9]
    assert respaced_timesteps(11, 3).tolist() == [0, 5, 10]
    assert respaced_timesteps(1000, 1).tolist() == [999]
    assert respaced_timesteps(1000, 2).tolist() == [0, 999]
    assert torch.equal(respaced_timesteps(1000, 1000), torch.arange(1000))


def test_respaced_timesteps_are_distinct_for_every_step_count():
    for T in (7, 100):
        for steps in range(1, T + 1):
            kept = respaced_timesteps(T, steps)
            assert len(kept) == steps and len(torch.unique(kept)) == steps
            assert kept[-1] == T - 1 and kept.min() >= 0


def test_impossible_step_counts_raise():
    with pytest.raises(ValueError, match="1 <= steps <= 1000"):
        respaced_timesteps(1000, 0)
    with pytest.raises(ValueError, match="1 <= steps <= 1000"):
        respaced_timesteps(1000, 1001)


def test_betas_for_alphas_cumprod_reproduces_the_kept_alpha_bars():
    alphas_cumprod = torch.cumprod(1 - make_betas("cosine", 1000), 0)
    kept = respaced_timesteps(1000, 25)
    new_betas = betas_for_alphas_cumprod(alphas_cumprod[kept])
    torch.testing.assert_close(torch.cumprod(1 - new_betas, 0), alphas_cumprod[kept],
                               rtol=1e-9, atol=0)
    assert ((new_betas > 0) & (new_betas < 1)).all()
