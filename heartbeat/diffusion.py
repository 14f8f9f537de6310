"""Noise schedules, training loss, samplers; guidance lives in heartbeat/guidance.py.

Written from the papers, independent of the networks: a sampler sees only `model_fn(x_t, t) ->
prediction`, with x_t shaped (B, C, H, W) or (B, F, C, H, W) and t a (B,) int64 tensor of timesteps.

    sched = Schedule.sd15()                       # or Schedule.from_config(cfg.model)
    loss, info = training_loss(model_fn, x0, sched, prediction="eps", generator=g)
    x_T = noise_like((B, 4, 32, 32), [torch.Generator().manual_seed(s) for s in seeds])
    x0 = sample(model_fn, x_T, steps=50, sampler="ddim", schedule=sched)

Notation (DDPM, Ho et al. 2020): alphas_cumprod[t] = abar_t, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
(eq. 4). Timesteps are 0-based, 0..T-1 (t=0 is the first noising step, as in SD1.5).
Parameterisations: "eps" (noise), "x0" (data), "v" = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans &
Ho 2022, §4 / App. D).

Schedules (`Schedule.make`): scaled_linear (SD1.5, linear in sqrt(beta)), linear (DDPM), cosine
(Nichol & Dhariwal 2021 eq. 17); zero_terminal_snr=True rescales any of them so abar_{T-1} = 0 (Lin
et al. 2024, Alg. 1): train such a model with v (or x0) prediction, eps cannot be sampled from abar = 0.
Training (`training_loss`): MSE on the parameterisation's target, optional min-SNR-gamma weights (Hang
et al. 2023). `ddim_invert` runs DDIM eta = 0 backwards (data -> x_T).

Samplers (`sample(sampler=...)`):
    ddpm     ancestral sampling with the posterior q(x_s | x_t, x0) of DDPM eq. 6-7, on any subset of
             timesteps (the respacing of Nichol & Dhariwal 2021: beta' = 1 - abar_t / abar_s).
    ddim     DDIM eq. 12 with sigma from eq. 16 (eta = 0 deterministic, eta = 1 equals ddpm).
    dpmpp2m  DPM-Solver++(2M), Lu et al. 2022, Algorithm 2: multistep, data prediction, first-order
             first step; the last step is first-order when it lands on sigma = 0 (where the 2nd-order
             correction is undefined: r = h_prev / h = 0) or when steps < 15 ("lower_order_final").
    lcm      multistep consistency sampling (Luo et al. 2023, LCM Algorithm 3; Song et al. 2023, CM
             Algorithm 1) for a distilled student (heartbeat/distill.py): x0 = f(x_t, t) with the
             consistency function of `consistency`, then x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) z with
             fresh noise z, at the timesteps of `lcm_timesteps`; the last step returns x0.

Timestep spacings (Lin et al. 2024, Table 2; T = schedule length, S = steps):
    leading   (arange(S) * (T // S))[::-1] + steps_offset  -- SD1.5 uses steps_offset = 1: 981, 961, ..., 1
    trailing  round(arange(T, 0, -T / S)) - 1               -- 999, 979, ..., 19 (ends at t=T-1)
    linspace  round(linspace(0, T - 1, S))[::-1]            -- 999, ..., 0
Each step goes from timesteps[i] to timesteps[i + 1]; the last step goes to the "final" level:
abar = 1 (a clean sample) when set_alpha_to_one is True, else abar = alphas_cumprod[0] (SD1.5's
DDIM, `set_alpha_to_one=False`). By default (None) ddim uses False, as SD1.5 does, and ddpm and
dpmpp2m use True (as the reference DDPM and DPM-Solver++ implementations do).
With "linspace" (last timestep 0) and the final level abar_0, the last step is a no-op.
Note: the reference DDIM implementation steps to t - T // S rather than to the next listed timestep;
the two agree for "leading" and for "trailing" when S divides T, and differ for "linspace".

Per-sample generators: wherever a `generator` is taken it may be one torch.Generator (noise for the
whole batch in one draw) or a list of generators, one per batch element, so that sample i's noise
depends only on generator i (results independent of batch composition, docs/ARCHITECTURE.md
§Tensors). A stochastic sampler draws exactly one noise tensor shaped like x per stochastic step (ddim with
eta > 0: every step; ddpm: every step whose posterior variance is non-zero), nothing else.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .guidance import GuidanceSpec, guided

PREDICTIONS = ("eps", "v", "x0")
SCHEDULES = ("scaled_linear", "linear", "cosine")
SAMPLERS = ("ddpm", "ddim", "dpmpp2m", "lcm")
SPACINGS = ("leading", "trailing", "linspace")

def extract(a: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """a[t] (a float64 schedule array, t a (B,) int tensor) as x's dtype/device, shaped (B, 1, ..., 1)
    to broadcast against x ((B, C, H, W) or (B, F, C, H, W)); improved-diffusion's _extract_into_tensor."""
    t = torch.as_tensor(t).reshape(-1).long().cpu()
    out = a[t].to(device=x.device, dtype=x.dtype)
    return out.view(-1, *([1] * (x.dim() - 1)))


def _check_prediction(prediction: str) -> None:
    if prediction not in PREDICTIONS:
        raise ValueError(f"unknown prediction {prediction!r}; choose one of {', '.join(PREDICTIONS)}")


# -------------------------------------------------------------------------------- schedules

class Schedule:
    """A discrete noise schedule of T steps; every array float64 on the CPU, indexed by `extract`."""

    def __init__(self, betas: torch.Tensor, kind: str = "custom"):
        betas = torch.as_tensor(betas, dtype=torch.float64).cpu()
        if betas.dim() != 1 or not bool(((betas > 0) & (betas <= 1)).all()):
            raise ValueError("betas must be a 1-D tensor with values in (0, 1]")
        self.kind = kind
        self.betas = betas
        self.alphas = 1.0 - betas
        self.alphas_cumprod = torch.cumprod(self.alphas, 0)                       # abar_t, DDPM §2
        self.alphas_cumprod_prev = torch.cat([betas.new_ones(1), self.alphas_cumprod[:-1]])
        self.sqrt_alphas_cumprod = self.alphas_cumprod.sqrt()
        self.sqrt_one_minus_alphas_cumprod = (1.0 - self.alphas_cumprod).sqrt()

    @property
    def num_timesteps(self) -> int:
        return self.betas.numel()

    def __len__(self) -> int:
        return self.num_timesteps

    def __repr__(self) -> str:
        return (f"Schedule(kind={self.kind!r}, T={self.num_timesteps}, "
                f"abar[0]={self.alphas_cumprod[0].item():.6g}, abar[-1]={self.alphas_cumprod[-1].item():.6g})")

    # ---- constructors
    @classmethod
    def make(cls, kind: str = "scaled_linear", timesteps: int = 1000, beta_start: float = 0.00085,
             beta_end: float = 0.012, zero_terminal_snr: bool = False) -> "Schedule":
        T = int(timesteps)
        if T < 1:
            raise ValueError(f"timesteps must be >= 1, got {timesteps}")
        if kind == "scaled_linear":   # SD1.5 / LDM: linear in sqrt(beta)
            betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, T, dtype=torch.float64) ** 2
        elif kind == "linear":        # DDPM §4: beta linear from beta_start to beta_end
            betas = torch.linspace(beta_start, beta_end, T, dtype=torch.float64)
        elif kind == "cosine":        # Nichol & Dhariwal 2021 eq. 17, s = 0.008, betas clipped at 0.999
            s = 0.008
            steps = torch.arange(T + 1, dtype=torch.float64)
            f = torch.cos((steps / T + s) / (1 + s) * math.pi / 2) ** 2
            abar = f / f[0]
            betas = (1.0 - abar[1:] / abar[:-1]).clamp(max=0.999)
        else:
            raise ValueError(f"unknown schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
        if zero_terminal_snr:
            betas = _rescale_zero_terminal_snr(betas)
            kind = kind + "+ztsnr"
        return cls(betas, kind)

    @classmethod
    def sd15(cls) -> "Schedule":
        """Stable Diffusion 1.5: scaled_linear, 1000 steps, 0.00085 -> 0.012."""
        return cls.make("scaled_linear", 1000, 0.00085, 0.012)

    @classmethod
    def from_config(cls, model_cfg) -> "Schedule":
        """From a ModelConfig (schedule, timesteps, beta_start, beta_end, zero_terminal_snr)."""
        return cls.make(model_cfg.schedule, model_cfg.timesteps, model_cfg.beta_start,
                        model_cfg.beta_end, model_cfg.zero_terminal_snr)

    # ---- forward process and parameterisations
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps  (DDPM eq. 4)."""
        return extract(self.sqrt_alphas_cumprod, t, x0) * x0 + extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * noise

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """SNR(t) = abar_t / (1 - abar_t), float64, shaped like t (inf where abar_t = 1)."""
        a = self.alphas_cumprod[torch.as_tensor(t).long().cpu()]
        return a / (1.0 - a)

    def to_x0_eps(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, prediction: str = "eps"):
        """(x0, eps) implied by a model prediction of the given parameterisation at x_t, t."""
        _check_prediction(prediction)
        a = extract(self.sqrt_alphas_cumprod, t, x_t)              # alpha_t = sqrt(abar_t)
        s = extract(self.sqrt_one_minus_alphas_cumprod, t, x_t)    # sigma_t = sqrt(1 - abar_t)
        if prediction == "eps":
            eps = pred
            x0 = (x_t - s * eps) / a                                # DDPM eq. 4 solved for x0
        elif prediction == "x0":
            x0 = pred
            eps = (x_t - a * x0) / s
        else:  # v (Salimans & Ho 2022, App. D): x0 = alpha z - sigma v, eps = sigma z + alpha v
            x0 = a * x_t - s * pred
            eps = s * x_t + a * pred
        return x0, eps

    def from_x0_eps(self, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, prediction: str = "eps"):
        """The prediction of the given parameterisation for (x0, eps) at t (the training target)."""
        _check_prediction(prediction)
        if prediction == "eps":
            return eps
        if prediction == "x0":
            return x0
        return extract(self.sqrt_alphas_cumprod, t, x0) * eps - extract(self.sqrt_one_minus_alphas_cumprod, t, x0) * x0  # v

    def convert(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, src: str, dst: str) -> torch.Tensor:
        """A prediction in parameterisation `src` re-expressed as `dst` (eps | v | x0)."""
        x0, eps = self.to_x0_eps(pred, x_t, t, src)
        return self.from_x0_eps(x0, eps, t, dst)


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2024, Algorithm 1: shift and scale sqrt(abar) so that sqrt(abar_{T-1}) = 0 while
    sqrt(abar_0) is kept, then recover betas."""
    sqrt_abar = torch.cumprod(1.0 - betas, 0).sqrt()
    s0, sT = sqrt_abar[0].clone(), sqrt_abar[-1].clone()
    sqrt_abar = (sqrt_abar - sT) * (s0 / (s0 - sT))                   # Alg. 1: shift last to 0, keep first
    abar = sqrt_abar ** 2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


# ----------------------------------------------------------------------------- noise and RNG

def _as_generators(generator, batch: int):
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    gens = list(generator)
    if len(gens) != batch:
        raise ValueError(f"got {len(gens)} generators for a batch of {batch}: pass one per sample or a single one")
    return gens


def noise_like(shape: Sequence[int], generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """Standard normal noise of `shape`. `generator`: None, one torch.Generator (one draw of the whole
    shape), or a list of shape[0] generators: row i is drawn from generator i alone, so a sample's
    noise does not depend on which other samples share its batch."""
    shape = tuple(shape)
    gens = _as_generators(generator, shape[0])
    if gens is None or isinstance(gens, torch.Generator):
        gdev = gens.device if gens is not None else device
        out = torch.randn(shape, generator=gens, device=gdev, dtype=dtype)
    else:
        out = torch.stack([torch.randn(shape[1:], generator=g, device=g.device, dtype=dtype) for g in gens])
    return out.to(device) if device is not None else out


def _randint(high: int, batch: int, generator) -> torch.Tensor:
    gens = _as_generators(generator, batch)
    if gens is None or isinstance(gens, torch.Generator):
        return torch.randint(0, high, (batch,), generator=gens, device=gens.device if gens is not None else "cpu")
    return torch.cat([torch.randint(0, high, (1,), generator=g, device=g.device) for g in gens])


# ------------------------------------------------------------------------------------ loss

def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: str) -> torch.Tensor:
    """Min-SNR-gamma loss weight (Hang et al. 2023, eq. 8 and §3.4) for an MSE on the `prediction`
    target: x0 -> min(SNR, g); eps -> min(SNR, g) / SNR; v -> min(SNR, g) / (SNR + 1). Float64."""
    _check_prediction(prediction)
    snr = torch.as_tensor(snr, dtype=torch.float64)
    clipped = snr.clamp(max=gamma)                       # min(SNR, gamma)
    if prediction == "x0":
        return clipped
    if prediction == "eps":                              # min(SNR, g) / SNR, = 1 where SNR <= g (also SNR = 0)
        return torch.where(snr > gamma, gamma / snr, torch.ones_like(snr))
    return clipped / (snr + 1.0)                         # v


def training_loss(model_fn: Callable, x0: torch.Tensor, schedule: Schedule, prediction: str = "eps",
                  generator=None, min_snr_gamma: float = 0.0, t: torch.Tensor | None = None,
                  noise: torch.Tensor | None = None):
    """The denoising loss (DDPM eq. 14, "L_simple", on the target of the chosen parameterisation).

    x0: (B, C, H, W) frames or (B, F, C, H, W) clips. Per example, t ~ U{0..T-1} is drawn first
    (one randint of shape (B,)), then noise ~ N(0, I) shaped like x0 (independent per frame), both
    from `generator` (one generator, or a list with one per example) unless passed in. The loss is
    the per-example mean squared error, weighted by min-SNR-gamma when min_snr_gamma > 0, averaged
    over the batch. Returns (loss, info) with info = dict(t, mse (per example, unweighted), weight).
    """
    _check_prediction(prediction)
    B = x0.shape[0]
    if t is None:
        t = _randint(schedule.num_timesteps, B, generator)
    t = torch.as_tensor(t).long().to(x0.device)
    if noise is None:
        noise = noise_like(x0.shape, generator, device=x0.device, dtype=x0.dtype)
    x_t = schedule.q_sample(x0, t, noise)
    target = schedule.from_x0_eps(x0, noise, t, prediction)
    pred = model_fn(x_t, t)
    diff = pred - target.to(pred.dtype)
    diff = diff.to(torch.promote_types(diff.dtype, torch.float32))          # fp32 at least (bf16 autocast)
    mse = diff.pow(2).flatten(1).mean(1)                                     # (B,) per-example MSE
    if min_snr_gamma > 0:
        weight = min_snr_weight(schedule.snr(t), min_snr_gamma, prediction).to(mse)
    else:
        weight = torch.ones_like(mse)
    loss = (weight * mse).mean()
    return loss, {"t": t.detach(), "mse": mse.detach(), "weight": weight.detach()}


# ------------------------------------------------------------------------------- timesteps

def make_timesteps(steps: int, spacing: str = "leading", num_train_timesteps: int = 1000,
                   steps_offset: int = 1) -> list[int]:
    """The descending list of `steps` timesteps a sampler visits (see the module docstring).
    `steps_offset` applies to "leading" only (SD1.5: 1)."""
    T = int(num_train_timesteps)
    if spacing not in SPACINGS:
        raise ValueError(f"unknown timestep spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= T:
        raise ValueError(f"steps must be an integer in 1..{T} (the schedule length), got {steps!r}")
    if spacing == "leading":
        ratio = T // steps
        ts = [i * ratio + steps_offset for i in range(steps)][::-1]
        if ts[0] > T - 1 or ts[-1] < 0:
            raise ValueError(f"leading spacing with steps={steps} and steps_offset={steps_offset} leaves "
                             f"0..{T - 1}; use fewer steps, steps_offset=0, or spacing 'trailing'/'linspace'")
    elif spacing == "trailing":
        ts = (torch.arange(T, 0, -T / steps, dtype=torch.float64).round() - 1).long().tolist()
    else:
        ts = torch.linspace(0, T - 1, steps, dtype=torch.float64).round().long().flip(0).tolist()
    return ts


def lcm_timesteps(steps: int, num_train_timesteps: int = 1000, skip: int = 0) -> list[int]:
    """The timesteps a distilled student samples at: of the N = T // skip timesteps skip - 1,
    2 skip - 1, ..., N skip - 1 that latent consistency distillation trains on (LCM §4.3, the
    skipping-step schedule; skip = 0 means T // 50, LCM's N = 50), `steps` evenly spaced from the top."""
    T = int(num_train_timesteps)
    skip = int(skip) or max(1, T // 50)
    N = T // skip
    if not isinstance(steps, int) or isinstance(steps, bool) or not 1 <= steps <= N:
        raise ValueError(f"steps must be an integer in 1..{N} for a consistency sampler, got {steps!r}")
    origin = [(j + 1) * skip - 1 for j in range(N)][::-1]
    return origin[:: N // steps][:steps]


def consistency(schedule: "Schedule", pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                prediction: str = "eps", sigma_data: float = 0.5, scale: float = 10.0) -> torch.Tensor:
    """The consistency function of a model prediction at (x_t, t): f = c_skip(t) x_t + c_out(t) x0(x_t, t)
    (Song et al. 2023, CM §3, the parameterisation that meets f(x, 0) = x; LCM §4.1 with the x0
    predicted from the model's eps / v / x0), with c_skip(t) = sigma_d^2 / (s^2 + sigma_d^2),
    c_out(t) = s / sqrt(s^2 + sigma_d^2), s = scale * t * 1000 / T (LCM's timestep scaling of 10 on a
    1000-step schedule), sigma_d = 0.5. At any trained timestep but 0, f is almost x0."""
    x0, _ = schedule.to_x0_eps(pred, x_t, t, prediction)
    s = torch.as_tensor(t).reshape(-1).double().cpu() * (scale * 1000.0 / schedule.num_timesteps)
    c_skip = sigma_data ** 2 / (s ** 2 + sigma_data ** 2)
    c_out = s / (s ** 2 + sigma_data ** 2).sqrt()
    shape = (-1,) + (1,) * (x_t.dim() - 1)
    c_skip = c_skip.to(device=x_t.device, dtype=x_t.dtype).view(shape)
    c_out = c_out.to(device=x_t.device, dtype=x_t.dtype).view(shape)
    return c_skip * x_t + c_out * x0


def _lam(abar: float) -> float:
    """lambda = log(alpha / sigma) = 0.5 log(abar / (1 - abar)) (DPM-Solver's half log-SNR), +-inf at the ends."""
    if abar <= 0.0:
        return -math.inf
    if abar >= 1.0:
        return math.inf
    return 0.5 * (math.log(abar) - math.log1p(-abar))


def _resolve_steps(schedule: Schedule, steps, spacing, steps_offset, timesteps, set_alpha_to_one, default_one):
    T = schedule.num_timesteps
    if timesteps is None:
        ts = make_timesteps(steps, spacing, T, steps_offset)
    else:
        ts = [int(v) for v in timesteps]
        if not ts or any(b >= a for a, b in zip(ts, ts[1:])) or ts[0] > T - 1 or ts[-1] < 0:
            raise ValueError(f"timesteps must be strictly decreasing integers in 0..{T - 1}")
    one = default_one if set_alpha_to_one is None else bool(set_alpha_to_one)
    final = 1.0 if one else schedule.alphas_cumprod[0].item()
    abars = [schedule.alphas_cumprod[t].item() for t in ts] + [final]   # level i -> level i+1 per step
    return ts, abars


# ---------------------------------------------------------------------------------- sampling

@torch.no_grad()
def sample(model_fn: Callable, x_T: torch.Tensor, steps: int = 50, sampler: str = "ddim",
           schedule: Schedule | None = None, prediction: str = "eps", eta: float = 0.0,
           spacing: str = "leading", generator=None, guidance=None, guidance_rescale: float = 0.0,
           progress: bool = False, callback: Callable | None = None, steps_offset: int = 1,
           set_alpha_to_one: bool | None = None, timesteps: Sequence[int] | None = None,
           lcm_skip: int = 0) -> torch.Tensor:
    """Run a sampler from x_T down to a clean sample and return it (same shape as x_T), without grad.

    model_fn(x_t, t) -> prediction (`prediction`: eps | v | x0), t a (B,) int64 tensor.
    guidance: None, or a GuidanceSpec / spec string / number (heartbeat.guidance); then model_fn is a
    multi-condition model `model_fn(x_t, t, cond_sets)` and is wrapped by guidance.guided(...,
    rescale=guidance_rescale); a single scale then conditions on every condition in the batch (use
    guidance.guided(..., given=...) directly to name them). generator: for the stochastic samplers (ddpm, ddim with eta > 0); one
    torch.Generator or one per sample. callback(i, t, x_next, x0_pred) after every step.
    steps_offset, set_alpha_to_one, timesteps (an explicit descending list): see the module docstring.
    lcm: model_fn is a distilled student; its timesteps are lcm_timesteps(steps, T, lcm_skip).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    _check_prediction(prediction)
    schedule = schedule if schedule is not None else Schedule.sd15()
    if guidance is not None:
        spec = guidance if isinstance(guidance, GuidanceSpec) else GuidanceSpec.parse(str(guidance))
        model_fn = guided(model_fn, spec, rescale=guidance_rescale)
    if sampler == "lcm" and timesteps is None:
        timesteps = lcm_timesteps(steps, schedule.num_timesteps, lcm_skip)
    ts, abars = _resolve_steps(schedule, steps, spacing, steps_offset, timesteps, set_alpha_to_one,
                               default_one=(sampler != "ddim"))
    if prediction == "eps" and abars[0] == 0.0:
        raise ValueError("eps-prediction cannot be converted to x0 at zero terminal SNR (abar = 0 at the first "
                         "timestep); use prediction 'v' or 'x0' (Lin et al. 2024, §3.2)")
    gens = _as_generators(generator, x_T.shape[0])
    x = x_T
    B = x.shape[0]
    it = range(len(ts))
    if progress:
        from tqdm import tqdm
        it = tqdm(it, desc=sampler, leave=False)
    m_prev, h_prev = None, None                      # dpmpp2m history: previous x0 prediction, step size
    for i in it:
        t = ts[i]
        a_t, a_s = abars[i], abars[i + 1]            # abar now, abar after the step (s < t)
        tt = torch.full((B,), t, dtype=torch.long, device=x.device)
        pred = model_fn(x, tt)
        x0, eps = schedule.to_x0_eps(pred, x, tt, prediction)
        if sampler == "lcm":
            x0 = consistency(schedule, pred, x, tt, prediction)          # LCM Alg. 3: x0 = f(x_t, t)
            x = x0
            if a_s < 1.0:                                                 # back to the next timestep
                x = math.sqrt(a_s) * x0 + math.sqrt(1 - a_s) * noise_like(x.shape, gens, device=x.device,
                                                                           dtype=x.dtype)
        elif sampler == "ddim":
            # DDIM eq. 16: sigma = eta sqrt((1 - abar_s)/(1 - abar_t)) sqrt(1 - abar_t/abar_s)
            sigma = eta * math.sqrt((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)) if eta > 0 else 0.0
            # DDIM eq. 12: x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma^2) eps + sigma z
            x = math.sqrt(a_s) * x0 + math.sqrt(max(1.0 - a_s - sigma ** 2, 0.0)) * eps
            if eta > 0:
                x = x + sigma * noise_like(x.shape, gens, device=x.device, dtype=x.dtype)
        elif sampler == "ddpm":
            beta = 1.0 - a_t / a_s                   # respaced beta (Nichol & Dhariwal 2021, §4)
            # DDPM eq. 7: mu = sqrt(abar_s) beta/(1-abar_t) x0 + sqrt(1-beta) (1-abar_s)/(1-abar_t) x_t
            x = (math.sqrt(a_s) * beta / (1 - a_t)) * x0 + (math.sqrt(1 - beta) * (1 - a_s) / (1 - a_t)) * x
            var = (1 - a_s) / (1 - a_t) * beta      # DDPM eq. 7: beta_tilde
            if var > 0:
                x = x + math.sqrt(var) * noise_like(x.shape, gens, device=x.device, dtype=x.dtype)
        else:  # dpmpp2m
            al_t, sg_t = math.sqrt(a_s), math.sqrt(1 - a_s)                     # target alpha, sigma
            sg_s = math.sqrt(1 - a_t)
            h = _lam(a_s) - _lam(a_t)                                           # h_i = lambda_{t_i} - lambda_{t_{i-1}}
            last = i == len(ts) - 1
            first_order = m_prev is None or h == 0 or (last and (a_s >= 1.0 or len(ts) < 15))
            if first_order:
                d = x0                                                          # DPM-Solver++(1) = DDIM
            else:
                r = h_prev / h                                                  # Alg. 2: r_i = h_{i-1} / h_i
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * m_prev             # Alg. 2: D_i
            # Alg. 2: x_{t_i} = sigma_{t_i}/sigma_{t_{i-1}} x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i
            x = (sg_t / sg_s) * x - (al_t * math.expm1(-h)) * d
            m_prev, h_prev = x0, h
        if callback is not None:
            callback(i, t, x, x0)
    return x


@torch.no_grad()
def ddim_invert(model_fn: Callable, x0: torch.Tensor, steps: int = 50, schedule: Schedule | None = None,
                prediction: str = "eps", spacing: str = "leading", steps_offset: int = 1,
                set_alpha_to_one: bool = False, timesteps: Sequence[int] | None = None) -> torch.Tensor:
    """Deterministic DDIM inversion (eq. 12 with eta = 0 run backwards): from a sample at the final
    level (what `sample(sampler="ddim", eta=0)` with the same settings returns) up to the first
    sampling timestep, so that `sample(..., x_T=ddim_invert(...))` returns about x0. Each step from
    level s up to timestep t evaluates the model at (x_s, t), the usual approximation (eps is
    assumed locally constant), exact in the limit of many steps."""
    _check_prediction(prediction)
    schedule = schedule if schedule is not None else Schedule.sd15()
    ts, abars = _resolve_steps(schedule, steps, spacing, steps_offset, timesteps, set_alpha_to_one, False)
    x = x0
    B = x.shape[0]
    for i in reversed(range(len(ts))):
        t = ts[i]
        a_t, a_s = abars[i], abars[i + 1]            # going up: from level a_s to level a_t
        tt = torch.full((B,), t, dtype=torch.long, device=x.device)
        pred = model_fn(x, tt)
        _, eps = schedule.to_x0_eps(pred, x, tt, prediction)   # eps at the target timestep
        x0_hat = (x - math.sqrt(1 - a_s) * eps) / math.sqrt(a_s)
        x = math.sqrt(a_t) * x0_hat + math.sqrt(1 - a_t) * eps  # DDIM eq. 12, eta = 0, s -> t
    return x
