"""The EDM formulation (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models"): preconditioning, log-normal training noise and Heun samplers.

The same U-Nets serve both formulations. Under EDM the data is noised as x = x0 + sigma * n
with a continuous noise level sigma, and the network F is wrapped into a denoiser

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))

with the paper's Table 1 choices: c_skip = sd^2 / (sigma^2 + sd^2), c_out = sigma sd / sqrt(sigma^2 + sd^2),
c_in = 1 / sqrt(sigma^2 + sd^2), c_noise = ln(sigma) / 4 (sd: ``sigma_data``). The network is called
with c_noise where the DDPM formulation passes a timestep (its sinusoidal embedding takes
fractional values). Training draws ln(sigma) ~ N(p_mean, p_std^2) and regresses F on
(x0 - c_skip x) / c_out: that plain MSE equals the paper's lambda(sigma) ||D - x0||^2 with
lambda = 1 / c_out^2.

Classifier-free guidance needs nothing new: D is affine in F with coefficients shared by the
conditional and unconditional halves, so guiding F guides D. Thresholding acts on D, the x0
prediction. Noise conditioning augmentation keeps the variance-preserving forward process
of ``diffusion.schedule`` (``imagen.super_resolution``), so its levels mean the same in both
formulations.

Samplers (generators of ``imagen.samplers.SamplerStep``, like the DDPM ones), over the
noise levels sigma_i = (sigma_max^(1/rho) + i / (N - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho,
i < N, and sigma_N = 0:
  heun             Algorithm 1: deterministic, second order (2N - 1 network evaluations);
  heun_stochastic  Algorithm 2: the same, with noise added back at each step (s_churn,
                   s_tmin, s_tmax, s_noise), which corrects errors of an imperfect network.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from imagen.diffusion import append_dims
from imagen.samplers import Inpainting, ModelFn, SamplerStep, Thresholding, randn_like, run_to_end, threshold_fn


class ElucidatedDiffusion:
    """The EDM formulation's settings and math. Every method that needs a network takes it.

    Args:
        sigma_data: standard deviation of the data (the preconditioning's sd).
        p_mean, p_std: training noise levels are log-normal, ln(sigma) ~ N(p_mean, p_std^2).
        sigma_min, sigma_max, rho: the sampling noise levels (see the module docstring).
        s_churn, s_tmin, s_tmax, s_noise: the stochastic sampler's noise, Algorithm 2.
    """

    def __init__(self, sigma_data: float = 0.5, p_mean: float = -1.2, p_std: float = 1.2,
                 sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0,
                 s_churn: float = 40.0, s_tmin: float = 0.05, s_tmax: float = 50.0, s_noise: float = 1.003) -> None:
        if not (sigma_data > 0 and p_std > 0 and 0 < sigma_min < sigma_max and rho > 0):
            raise ValueError("EDM needs sigma_data > 0, p_std > 0, 0 < sigma_min < sigma_max and rho > 0")
        self.sigma_data, self.p_mean, self.p_std = sigma_data, p_mean, p_std
        self.sigma_min, self.sigma_max, self.rho = sigma_min, sigma_max, rho
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = s_churn, s_tmin, s_tmax, s_noise

    def preconditioning(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in, c_noise) for noise levels sigma (B,), each (B,)."""
        sd2 = self.sigma_data**2
        total = sigma**2 + sd2
        return sd2 / total, sigma * self.sigma_data / total.sqrt(), total.rsqrt(), sigma.log() / 4

    def denoise(self, model: Callable[..., torch.Tensor], x: torch.Tensor, sigma: torch.Tensor,
                **cond: Any) -> torch.Tensor:
        """D(x; sigma): the x0 prediction (B, ...) of the preconditioned ``model`` at noise levels sigma (B,)."""
        c_skip, c_out, c_in, c_noise = self.preconditioning(sigma)
        scaled = append_dims(c_in, x.ndim) * x
        return append_dims(c_skip, x.ndim) * x + append_dims(c_out, x.ndim) * model(scaled, c_noise, **cond)

    def training_losses(self, model: Callable[..., torch.Tensor], x0: torch.Tensor, *,
                        sigma: torch.Tensor | None = None, noise: torch.Tensor | None = None,
                        generator: torch.Generator | None = None, **cond: Any) -> dict[str, torch.Tensor]:
        """Per-sample EDM loss of ``model`` on clean data x0 (B, ...).

        sigma (B,) and noise (like x0) are drawn with ``generator`` (on x0's device) when not
        given. Returns "loss" and "mse" (B,), equal: the MSE of F against its target, which is the
        lambda(sigma)-weighted denoising error; "sigma" (B,) and "noise_quartile" (B,) long,
        the quartile of sigma in the training distribution (0: least noisy), for logging.
        """
        batch = x0.shape[0]
        if sigma is None:
            normal = torch.randn(batch, generator=generator, device=x0.device, dtype=x0.dtype)
            sigma = (self.p_mean + self.p_std * normal).exp()
        if noise is None:
            noise = randn_like(x0, generator)
        c_skip, c_out, c_in, c_noise = self.preconditioning(sigma)
        x = x0 + append_dims(sigma, x0.ndim) * noise
        output = model(append_dims(c_in, x.ndim) * x, c_noise, **cond)
        target = (x0 - append_dims(c_skip, x.ndim) * x) / append_dims(c_out, x.ndim)
        if output.shape != target.shape:
            raise ValueError(f"model output shape {tuple(output.shape)} != target shape {tuple(target.shape)}")
        mse = (output - target).pow(2).flatten(1).mean(dim=1)
        standardised = (sigma.log() - self.p_mean) / self.p_std
        quantile = 0.5 * (1 + torch.erf(standardised / math.sqrt(2)))
        return {"loss": mse, "mse": mse, "sigma": sigma,
                "noise_quartile": (quantile * 4).long().clamp(0, 3)}

    def sigmas(self, steps: int, start: float | None = None) -> torch.Tensor:
        """The sampling noise levels (steps + 1,), float64, falling from ``start`` (default
        sigma_max) to sigma_min, spaced by rho, then 0."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        ramp = torch.linspace(0, 1, steps, dtype=torch.float64) if steps > 1 else torch.zeros(1, dtype=torch.float64)
        top = self.sigma_max if start is None else max(start, self.sigma_min)
        low, high = self.sigma_min ** (1 / self.rho), top ** (1 / self.rho)
        levels = (high + ramp * (low - high)) ** self.rho
        return torch.cat([levels, levels.new_zeros(1)])


@torch.no_grad()
def heun_sample_loop(
    diffusion: ElucidatedDiffusion,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    *,
    sigmas: torch.Tensor,
    churn: float = 0.0,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    thresholding: Thresholding = None,
    noise: torch.Tensor | None = None,
    inpaint: Inpainting | None = None,
) -> Iterator[SamplerStep]:
    """Heun's second-order method on the probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma,
    from sigmas[0] down to sigmas[-1]: Algorithm 1, or Algorithm 2 with ``churn`` (its gamma) > 0,
    which raises each level in [s_tmin, s_tmax] to sigma (1 + churn) with fresh noise first.

    ``noise``: the starting sample at sigmas[0] (default: a standard normal draw times sigmas[0]).
    ``model_fn(x, c_noise)`` is the guided network; it is preconditioned here. Each step yields
    the new sample and the (thresholded) denoised prediction it used; ``t`` is the step index.
    ``inpaint``: after every step the kept region is the image noised to the new level.
    """
    threshold = threshold_fn(thresholding)
    if noise is None:
        x = sigmas[0].item() * torch.randn(shape, generator=generator, device=device)
    elif tuple(noise.shape) == tuple(shape):
        x = noise
    else:
        raise ValueError(f"the starting sample has shape {tuple(noise.shape)}, expected {tuple(shape)}")

    def denoised(x: torch.Tensor, sigma: float) -> torch.Tensor:
        levels = torch.full((x.shape[0],), sigma, device=x.device, dtype=x.dtype)
        return threshold(diffusion.denoise(model_fn, x, levels))

    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        gamma = churn if diffusion.s_tmin <= sigma <= diffusion.s_tmax else 0.0
        sigma_hat = sigma * (1 + gamma)
        if gamma > 0:
            x = x + math.sqrt(sigma_hat**2 - sigma**2) * diffusion.s_noise * randn_like(x, generator)
        pred_x0 = denoised(x, sigma_hat)
        slope = (x - pred_x0) / sigma_hat
        x_next = x + (sigma_next - sigma_hat) * slope
        if sigma_next > 0:
            # The trapezoidal correction; the last step, onto sigma = 0, stays first order (Euler).
            slope_next = (x_next - denoised(x_next, sigma_next)) / sigma_next
            x_next = x + (sigma_next - sigma_hat) * 0.5 * (slope + slope_next)
        x = x_next
        if inpaint is not None:
            known = inpaint.image
            if sigma_next > 0:
                known = known + sigma_next * randn_like(known, generator)
            x = torch.lerp(x, known, inpaint.keep.to(x.dtype))
        yield SamplerStep(x, pred_x0, i)


SAMPLERS = ("heun", "heun_stochastic")


def sample(
    diffusion: ElucidatedDiffusion,
    model_fn: ModelFn,
    shape: tuple[int, ...],
    *,
    sampler: str = "heun",
    steps: int = 25,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    thresholding: Thresholding = None,
    noise: torch.Tensor | None = None,
    init: torch.Tensor | None = None,
    strength: float = 1.0,
    on_step: Callable[[SamplerStep], None] | None = None,
    inpaint: Inpainting | None = None,
) -> torch.Tensor:
    """Run an EDM sampler over ``steps`` noise levels and return the final sample (shape ``shape``);
    the same interface as ``imagen.samplers.sample``.

    Image-to-image (SDEdit): with ``init``, ``round(strength * steps)`` steps run from ``init``
    plus noise of level tan(strength * pi / 2), down to sigma_min on the rho spacing.
    That is the level the cosine schedule reaches at the fraction ``strength`` of the diffusion,
    so a strength edits about as much as it does under the ddpm formulation. Strength 1 samples
    from noise (``init`` unused), 0 returns ``init``.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown EDM sampler {sampler!r}; expected one of {tuple(SAMPLERS)}")
    if inpaint is not None and inpaint.resample > 1:
        raise ValueError(f"inpainting with resampling runs the DDPM formulation's ancestral sampler, not {sampler!r}")
    # Algorithm 2's gamma is set by the full step count, also when an edit runs fewer steps.
    churn = min(diffusion.s_churn / steps, math.sqrt(2) - 1) if sampler == "heun_stochastic" else 0.0
    sigmas = diffusion.sigmas(steps)
    if init is not None:
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        count = round(strength * steps)
        if count == 0:
            return init
        start = math.tan(strength * math.pi / 2) if strength < 1.0 else math.inf
        if start < diffusion.sigma_max:
            sigmas = diffusion.sigmas(count, start=start)
            noise = init + sigmas[0].item() * randn_like(init, generator)
    loop = heun_sample_loop(diffusion, model_fn, shape, sigmas=sigmas, churn=churn,
                            generator=generator, device=device, thresholding=thresholding, noise=noise,
                            inpaint=inpaint)
    return run_to_end(loop, on_step)
