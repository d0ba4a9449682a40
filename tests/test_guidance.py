import functools

import pytest
import torch

from imagen.diffusion import GaussianDiffusion
from imagen.guidance import ClassifierFreeGuidance, draw_cond_drop
from imagen.samplers import ddim_sample_loop

NULL_SHIFT = -0.7  # what the toy network adds in place of the text for dropped rows


class ToyNetwork:
    """Elementwise stand-in for the U-Net with the project's call signature; records calls."""

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(self, x, t, *, text_emb, text_mask, drop_text, low_res=None, aug_level=None):
        self.calls.append(dict(x=x, t=t, text_emb=text_emb, text_mask=text_mask,
                               drop_text=drop_text, low_res=low_res, aug_level=aug_level))
        pooled = (text_emb * text_mask[..., None]).sum(dim=(1, 2))  # (B,)
        shift = torch.where(drop_text, torch.full_like(pooled, NULL_SHIFT), pooled)
        time_scale = (1 + t.float() / 1000).reshape(-1, 1, 1, 1)
        out = torch.sin(x) * time_scale + shift.reshape(-1, 1, 1, 1)
        if aug_level is not None:
            out = out + aug_level.reshape(-1, 1, 1, 1)
        return out


def make_inputs(batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 1, 4, 4, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    text_mask = torch.arange(5)[None, :] < torch.tensor([5, 2, 3])[:batch, None]
    cond = dict(text_emb=torch.randn(batch, 5, 8, generator=g), text_mask=text_mask)
    return x, t, cond


def separate_predictions(x, t, cond) -> tuple[torch.Tensor, torch.Tensor]:
    network = ToyNetwork()
    batch = x.shape[0]
    conditional = network(x, t, drop_text=torch.zeros(batch, dtype=torch.bool), **cond)
    unconditional = network(x, t, drop_text=torch.ones(batch, dtype=torch.bool), **cond)
    return conditional, unconditional


def test_weight_one_is_exactly_the_conditional_and_weight_zero_exactly_the_unconditional():
    x, t, cond = make_inputs()
    conditional, unconditional = separate_predictions(x, t, cond)
    assert torch.equal(ClassifierFreeGuidance(ToyNetwork(), 1.0)(x, t, **cond), conditional)
    assert torch.equal(ClassifierFreeGuidance(ToyNetwork(), 0.0)(x, t, **cond), unconditional)
    assert not torch.equal(conditional, unconditional)


def test_guidance_extrapolates_linearly_from_one_batched_forward():
    x, t, cond = make_inputs()
    conditional, unconditional = separate_predictions(x, t, cond)
    network = ToyNetwork()
    guided = ClassifierFreeGuidance(network, 5.0)(x, t, **cond)
    # One forward of the doubled batch against two of half size: equal up to float32 rounding.
    torch.testing.assert_close(guided, 5 * conditional - 4 * unconditional)

    (call,) = network.calls
    assert torch.equal(call["drop_text"], torch.tensor([False] * 3 + [True] * 3))
    assert torch.equal(call["x"], torch.cat([x, x])) and torch.equal(call["t"], torch.cat([t, t]))
    assert torch.equal(call["text_emb"], torch.cat([cond["text_emb"]] * 2))
    assert call["text_mask"].dtype == torch.bool
    assert torch.equal(call["text_mask"], torch.cat([cond["text_mask"]] * 2))


def test_low_res_none_passes_through_and_aug_level_is_duplicated():
    x, t, cond = make_inputs()
    aug_level = torch.tensor([0.0, 0.1, 0.25])
    network = ToyNetwork()
    guided = ClassifierFreeGuidance(network, 2.0)(x, t, low_res=None, aug_level=aug_level, **cond)
    (call,) = network.calls
    assert call["low_res"] is None
    assert torch.equal(call["aug_level"], torch.cat([aug_level, aug_level]))
    conditional, unconditional = separate_predictions(x, t, cond)
    shift = aug_level.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(guided, 2 * (conditional + shift) - (unconditional + shift))


def test_guidance_refuses_a_caller_supplied_drop_text():
    x, t, cond = make_inputs()
    with pytest.raises(TypeError, match="drop_text"):
        ClassifierFreeGuidance(ToyNetwork(), 3.0)(x, t, drop_text=torch.zeros(3, dtype=torch.bool),
                                                  **cond)


def test_guiding_v_is_guiding_eps():
    diffusion = GaussianDiffusion.from_schedule("cosine", 1000, objective="v")
    g = torch.Generator().manual_seed(1)
    x_t = torch.randn(4, 1, 3, 3, generator=g, dtype=torch.float64)
    t = torch.tensor([10, 300, 600, 990])
    v_cond, v_uncond = torch.randn(2, 4, 1, 3, 3, generator=g, dtype=torch.float64)
    w = 7.0

    def eps_of(v):
        return diffusion.eps_from_x0(x_t, t, diffusion.x0_from_output(x_t, t, v))

    torch.testing.assert_close(eps_of(w * v_cond + (1 - w) * v_uncond),
                               w * eps_of(v_cond) + (1 - w) * eps_of(v_uncond))


def test_network_is_called_once_per_guided_sampling_step():
    diffusion = GaussianDiffusion.from_schedule("cosine", 1000).respace(10)
    network = ToyNetwork()
    _, _, cond = make_inputs()
    guided = functools.partial(ClassifierFreeGuidance(network, 4.0), **cond)
    steps = list(ddim_sample_loop(diffusion, guided, (3, 1, 4, 4),
                                  generator=torch.Generator().manual_seed(2)))
    assert len(steps) == 10 and len(network.calls) == 10
    assert all(call["x"].shape[0] == 6 for call in network.calls)


def test_cond_drop_probability_is_honoured():
    drop = draw_cond_drop(200_000, 0.1, generator=torch.Generator().manual_seed(3))
    assert drop.dtype == torch.bool and drop.shape == (200_000,)
    assert drop.float().mean().item() == pytest.approx(0.1, abs=0.003)  # sd 0.0007
    assert not draw_cond_drop(1000, 0.0).any()
    assert draw_cond_drop(1000, 1.0).all()


def test_cond_drop_is_reproducible_with_a_seeded_generator():
    first = draw_cond_drop(500, 0.3, generator=torch.Generator().manual_seed(4))
    again = draw_cond_drop(500, 0.3, generator=torch.Generator().manual_seed(4))
    other = draw_cond_drop(500, 0.3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, again) and not torch.equal(first, other)
    with pytest.raises(ValueError, match="cond_drop_prob"):
        draw_cond_drop(4, 1.5)
