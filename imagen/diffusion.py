"""Gaussian diffusion: forward process, posteriors, parameterisations, loss, thresholding.

No network lives here. ``GaussianDiffusion`` holds the float64 schedule
quantities and every method that needs a network takes it as an argument.

Conventions used throughout:
  x0, x_t, noise: (B, C, H, W) (any shape (B, ...) works).
  t: LongTensor (B,) of step indices into *this* diffusion, 0..num_timesteps-1.
     For the full process they equal the original timesteps; for a respaced
     process ``timestep_map[t]`` gives the original timestep, which is what
     the network is always called with.
  alpha-bar_t = prod_{s<=t} (1 - beta_s);  x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps.
  v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0  (Salimans & Ho 2022).
"""

from collections.abc import Callable
from typing import Any

import torch

from imagen.schedules import betas_for_alphas_cumprod, make_betas, respaced_timesteps

OBJECTIVES = ("eps", "v")
THRESHOLD_MODES = ("none", "static", "dynamic")


class GaussianDiffusion:
    """A discrete-time Gaussian diffusion process defined by its betas.

    Args:
        betas: float64 (N,), each in (0, 1).
        objective: what the network predicts, "eps" (the paper's) or "v".
        timestep_map: LongTensor (N,) mapping this process's step index to the
            original timestep the network is trained on; identity if None.
    """

    def __init__(
        self,
        betas: torch.Tensor,
        objective: str = "eps",
        timestep_map: torch.Tensor | None = None,
    ) -> None:
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {objective!r}; expected one of {OBJECTIVES}")
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.ndim != 1 or len(betas) == 0:
            raise ValueError(
                f"betas must be a non-empty 1-D tensor, got shape {tuple(betas.shape)}")
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError("betas must lie in (0, 1)")
        num_timesteps = len(betas)
        if timestep_map is None:
            timestep_map = torch.arange(num_timesteps)
        timestep_map = torch.as_tensor(timestep_map, dtype=torch.long).cpu()
        if timestep_map.shape != betas.shape:
            raise ValueError(f"timestep_map has shape {tuple(timestep_map.shape)}, "
                             f"betas {tuple(betas.shape)}")

        self.betas = betas
        self.objective = objective
        self.timestep_map = timestep_map
        self.num_timesteps = num_timesteps
        self._device_tables: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}

        self.alphas_cumprod = torch.cumprod(1 - betas, dim=0)
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1 - self.alphas_cumprod).sqrt()
        self.snr = self.alphas_cumprod / (1 - self.alphas_cumprod)

        # q(x_{t-1} | x_t, x0) = N(coef_x0 * x0 + coef_xt * x_t, posterior_variance).
        # At t = 0, alpha-bar_{-1} = 1 so the mean is x0 and the variance 0.
        self.posterior_variance = betas * (1 - self.alphas_cumprod_prev) / (1 - self.alphas_cumprod)
        self.posterior_mean_coef_x0 = (
            betas * self.alphas_cumprod_prev.sqrt() / (1 - self.alphas_cumprod)
        )
        self.posterior_mean_coef_xt = (
            (1 - self.alphas_cumprod_prev) * (1 - betas).sqrt() / (1 - self.alphas_cumprod)
        )

    @classmethod
    def from_schedule(
        cls,
        schedule: str,
        timesteps: int = 1000,
        objective: str = "eps",
        *,
        linear_start: float = 1e-4,
        linear_end: float = 0.02,
    ) -> "GaussianDiffusion":
        """Full process of a named schedule (see ``imagen.schedules.make_betas``)."""
        betas = make_betas(schedule, timesteps, linear_start=linear_start, linear_end=linear_end)
        return cls(betas, objective)

    def respace(self, steps: int) -> "GaussianDiffusion":
        """A process over ``steps`` of this one's timesteps, for faster sampling.

        The kept steps are ``respaced_timesteps(num_timesteps, steps)``; their
        alpha-bar values are kept exactly, so every x_t the new process visits
        has the marginal the network was trained on, and the betas are
        recomputed from them. ``timestep_map`` composes, so respacing a
        respaced process still feeds the network original timesteps.
        """
        kept = respaced_timesteps(self.num_timesteps, steps)
        betas = betas_for_alphas_cumprod(self.alphas_cumprod[kept])
        return GaussianDiffusion(betas, self.objective, self.timestep_map[kept])

    def first_steps(self, count: int) -> "GaussianDiffusion":
        """The process over this one's first ``count`` step indices (the least noisy): the same
        betas and timesteps, so it ends where this one does. Image-to-image sampling starts
        from an image noised to its last step."""
        if not 1 <= count <= self.num_timesteps:
            raise ValueError(f"count must be in [1, {self.num_timesteps}], got {count}")
        return GaussianDiffusion(self.betas[:count], self.objective, self.timestep_map[:count])

    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Original timesteps (B,) long, on t's device, for step indices t (B,)."""
        return self.table("timestep_map", t.device)[t]

    def table(self, name: str, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The per-step table ``name`` (N,) in ``dtype`` (default its own: float64, or long for
        ``timestep_map``) on ``device``, made once per device and dtype.

        The tables live on the CPU, where the samplers read scalars from them. A copy from the
        host at every use would make the host wait for the GPU several times a step, and
        indexing on the CPU instead would need t there, which waits too.
        """
        source = getattr(self, name)
        dtype = dtype or source.dtype
        key = (name, torch.device(device), dtype)
        if key not in self._device_tables:
            self._device_tables[key] = source.to(dtype).to(device)  # cast on the host: MPS has no float64
        return self._device_tables[key]

    def _gather(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Table ``name`` at step indices t (B,) as (B, 1, ..., 1) in like's dtype and device,
        to broadcast over like."""
        return append_dims(self.table(name, t.device, like.dtype)[t].to(like.device), like.ndim)

    # -- forward process and posterior ------------------------------------------------

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Draw x_t ~ q(x_t | x0) using the given standard normal ``noise``; (B, ...)."""
        return (self._gather("sqrt_alphas_cumprod", t, x0) * x0
                + self._gather("sqrt_one_minus_alphas_cumprod", t, x0) * noise)

    def q_posterior_mean_variance(
        self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean (B, ...) and variance (B, 1, ..., 1) of q(x_{t-1} | x_t, x0)."""
        mean = (self._gather("posterior_mean_coef_x0", t, x_t) * x0
                + self._gather("posterior_mean_coef_xt", t, x_t) * x_t)
        return mean, self._gather("posterior_variance", t, x_t)

    # -- conversions between eps, x0 and v --------------------------------------------

    def x0_from_output(self, x_t: torch.Tensor, t: torch.Tensor, model_output: torch.Tensor) -> torch.Tensor:
        """x0 implied by the network output (eps or v, per ``objective``) at x_t; (B, ...)."""
        sqrt_ab = self._gather("sqrt_alphas_cumprod", t, x_t)
        sqrt_one_minus_ab = self._gather("sqrt_one_minus_alphas_cumprod", t, x_t)
        if self.objective == "eps":
            return (x_t - sqrt_one_minus_ab * model_output) / sqrt_ab
        return sqrt_ab * x_t - sqrt_one_minus_ab * model_output

    def eps_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The noise that takes x0 to x_t at step t; (B, ...)."""
        return ((x_t - self._gather("sqrt_alphas_cumprod", t, x_t) * x0)
                / self._gather("sqrt_one_minus_alphas_cumprod", t, x_t))

    def v_from_eps(self, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0 for data x0 noised by eps at step t; (B, ...)."""
        return (self._gather("sqrt_alphas_cumprod", t, x0) * eps
                - self._gather("sqrt_one_minus_alphas_cumprod", t, x0) * x0)

    # -- training ----------------------------------------------------------------------

    def training_losses(
        self,
        model: Callable[..., torch.Tensor],
        x0: torch.Tensor,
        t: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        min_snr_gamma: float | None = None,
        **cond: Any,
    ) -> dict[str, torch.Tensor]:
        """Per-sample MSE loss of ``model`` on the objective's target.

        Args:
            model: called as model(x_t, original_t, **cond) -> (B, ...) prediction.
            x0: clean data (B, ...).
            t: step indices (B,); drawn uniformly with ``generator`` if None.
            noise: standard normal like x0; drawn with ``generator`` if None.
            generator: must live on x0's device.
            min_snr_gamma: if set, weight each sample by min(snr_t, gamma) / snr_t
                (eps) or min(snr_t, gamma) / (snr_t + 1) (v). Both equal
                min(snr_t, gamma) times the MSE of the implied x0, so the
                weighting means the same for either objective (Hang et al. 2023).
            **cond: passed to the model unchanged (text_emb, text_mask, drop_text, ...).

        Returns:
            "loss": (B,) weighted loss, "mse": (B,) unweighted, "t": (B,) the
            step indices used and "noise_quartile": (B,) their quartile (0: least
            noisy), for logging the loss per noise level.
        """
        batch = x0.shape[0]
        if t is None:
            t = torch.randint(0, self.num_timesteps, (batch,), generator=generator,
                              device=x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        x_t = self.q_sample(x0, t, noise)
        target = noise if self.objective == "eps" else self.v_from_eps(x0, t, noise)
        output = model(x_t, self.model_timesteps(t), **cond)
        if output.shape != target.shape:
            raise ValueError(f"model output shape {tuple(output.shape)} != "
                             f"target shape {tuple(target.shape)}")
        mse = (output - target).pow(2).flatten(1).mean(dim=1)
        loss = mse
        if min_snr_gamma is not None:
            loss = mse * self.min_snr_weight(t, min_snr_gamma, mse.dtype).to(mse.device)
        return {"loss": loss, "mse": mse, "t": t, "noise_quartile": t * 4 // self.num_timesteps}

    def min_snr_weight(self, t: torch.Tensor, gamma: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Min-SNR-gamma loss weight at step indices t (B,): (B,) in ``dtype``, on t's device."""
        if gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {gamma}")
        snr = self.table("snr", t.device, dtype)[t]
        clipped = snr.clamp(max=gamma)
        return clipped / snr if self.objective == "eps" else clipped / (snr + 1)


def append_dims(values: torch.Tensor, ndim: int) -> torch.Tensor:
    """Per-sample values (B,) as (B, 1, ..., 1) with ``ndim`` dimensions, to broadcast over a batch."""
    return values.reshape(-1, *([1] * (ndim - 1)))


def threshold_x0(
    x0: torch.Tensor,
    mode: str = "dynamic",
    percentile: float = 99.5,
    max_threshold: float | None = None,
) -> torch.Tensor:
    """Keep a predicted x0 (B, ...) inside the data range [-1, 1] (Imagen, sec. 2.3).

    none: unchanged. static: clip to [-1, 1].
    dynamic: per sample s = percentile(|x0|, p), s = max(s, 1), then
    s = min(s, max_threshold) if a cap is given; clip to [-s, s] and divide by
    s. Pixels that high guidance pushed past [-1, 1] are pulled back by
    rescaling rather than saturating, which is what lets large guidance
    weights produce natural images. Samples with s <= 1 get a plain clip.
    """
    if mode == "none":
        return x0
    if mode == "static":
        return x0.clamp(-1, 1)
    if mode != "dynamic":
        raise ValueError(f"unknown thresholding mode {mode!r}; expected one of {THRESHOLD_MODES}")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    if max_threshold is not None and max_threshold < 1:
        raise ValueError(f"max_threshold must be >= 1, got {max_threshold}")
    # quantile needs float32/64; half-precision inputs are measured in float32.
    magnitudes = x0.detach().abs().flatten(1).to(torch.promote_types(x0.dtype, torch.float32))
    s = torch.quantile(magnitudes, percentile / 100, dim=1)
    s = s.clamp(min=1)
    if max_threshold is not None:
        s = s.clamp(max=max_threshold)
    s = append_dims(s.to(x0.dtype), x0.ndim)
    return torch.maximum(torch.minimum(x0, s), -s) / s
