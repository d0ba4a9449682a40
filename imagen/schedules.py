"""Noise schedules: the per-timestep variances beta_t of the forward process.

A schedule is a float64 tensor ``betas`` of shape (T,), where step t turns
x_{t-1} into x_t by q(x_t | x_{t-1}) = N(sqrt(1 - beta_t) x_{t-1}, beta_t I).
Everything else (alpha-bar, posteriors, SNR) is derived from it in
``imagen.diffusion``. float64 is used because alpha-bar at the last steps is
tiny (~1e-9 for cosine) and the conversions divide by its square root.
"""

import math

import torch

SCHEDULES = ("cosine", "linear")

# Improved DDPM (Nichol & Dhariwal 2021, eq. 17): a small offset keeps beta_0
# from being vanishingly small, and clipping keeps the last betas below 1 where
# alpha-bar(t) -> 0.
_COSINE_OFFSET = 0.008
_MAX_BETA = 0.999


def make_betas(
    schedule: str,
    timesteps: int,
    *,
    linear_start: float = 1e-4,
    linear_end: float = 0.02,
) -> torch.Tensor:
    """Return the betas of a named schedule as a float64 tensor of shape (T,).

    ``cosine``: alpha-bar(t) = f(t) / f(0) with f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2),
    s = 0.008; beta_t = 1 - alpha-bar(t+1) / alpha-bar(t), clipped at 0.999.
    ``linear``: evenly spaced from linear_start to linear_end, both multiplied
    by 1000 / T so that any T gives roughly the same process as the DDPM
    paper's 1000 steps.
    """
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    if schedule == "cosine":
        betas = _cosine_betas(timesteps)
    elif schedule == "linear":
        scale = 1000.0 / timesteps
        betas = torch.linspace(
            scale * linear_start, scale * linear_end, timesteps, dtype=torch.float64
        )
    else:
        raise ValueError(f"unknown noise schedule {schedule!r}; expected one of {SCHEDULES}")
    if not bool(((betas > 0) & (betas < 1)).all()):
        raise ValueError(
            f"{schedule} schedule with {timesteps} timesteps gives betas outside (0, 1): "
            f"min {betas.min().item():.3g}, max {betas.max().item():.3g}"
        )
    return betas


def _cosine_betas(timesteps: int) -> torch.Tensor:
    """Cosine schedule betas, float64 (T,)."""
    steps = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((steps + _COSINE_OFFSET) / (1 + _COSINE_OFFSET) * (math.pi / 2)) ** 2
    betas = 1 - f[1:] / f[:-1]
    return betas.clamp(max=_MAX_BETA)


def respaced_timesteps(timesteps: int, steps: int) -> torch.Tensor:
    """The original timesteps kept when sampling with ``steps`` steps: LongTensor (steps,).

    Rule: t_i = round(i * (T - 1) / (steps - 1)) for i = 0..steps-1 (halves
    round up), i.e. evenly spaced and always including both 0, so the last
    update lands on clean data, and T - 1, so sampling starts from the
    noisiest step the model was trained on. steps = 1 keeps only T - 1;
    steps = T keeps every step. Increasing order, no duplicates.
    """
    if not 1 <= steps <= timesteps:
        raise ValueError(f"cannot sample with {steps} steps from a {timesteps}-step process; "
                         f"need 1 <= steps <= {timesteps}")
    if steps == 1:
        return torch.tensor([timesteps - 1], dtype=torch.long)
    # Integer arithmetic: floor(i * (T-1) / (S-1) + 1/2), exact for every T and S.
    i = torch.arange(steps, dtype=torch.long)
    return (2 * i * (timesteps - 1) + (steps - 1)) // (2 * (steps - 1))


def betas_for_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Betas of the process whose alpha-bar is exactly ``alphas_cumprod``: float64 (N,).

    Used for respacing: keeping a subset of timesteps means keeping their
    alpha-bar (the marginals q(x_t | x0) the model was trained on) and choosing
    each new beta so that the cumulative product reproduces them:
    beta_i = 1 - alpha-bar_i / alpha-bar_{i-1}, with alpha-bar_{-1} = 1.
    """
    previous = torch.cat([alphas_cumprod.new_ones(1), alphas_cumprod[:-1]])
    return 1 - alphas_cumprod / previous
