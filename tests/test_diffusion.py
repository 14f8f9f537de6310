"""Tests of heartbeat/diffusion.py and heartbeat/guidance.py (CPU, a few seconds).

Gaussian data x0 ~ N(mu, diag(s^2)) has a closed-form exact denoiser: with x_t = sqrt(a) x0 + sqrt(1-a) eps
(a = abar_t) and v_t = a s^2 + 1 - a = Var(x_t),
    E[x0 | x_t]  = mu + sqrt(a) s^2 / v_t (x_t - sqrt(a) mu)
    E[eps | x_t] = sqrt(1 - a) / v_t (x_t - sqrt(a) mu)
(jointly Gaussian regression: Cov(x0, x_t) = sqrt(a) s^2, Cov(eps, x_t) = sqrt(1 - a)), and the exact
probability-flow map from level a to level b is x -> sqrt(b) mu + sqrt(v_b / v_a) (x - sqrt(a) mu).
The samplers driven by this denoiser must reproduce mu and s, with errors that shrink with the steps.
"""
import math

import pytest
import torch

from heartbeat.config import CONDITIONS, ModelConfig
from heartbeat.diffusion import (SAMPLERS, SPACINGS, Schedule, ddim_invert, extract, make_timesteps,
                                 min_snr_weight, noise_like, sample, training_loss)
from heartbeat.guidance import GuidanceError, GuidanceSpec, expand_for_sets, guided, repeat_sets

MU = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
S = torch.tensor([0.5, 1.0, 1.5], dtype=torch.float64)


def gaussian_denoiser(sched, prediction, mu=MU, s=S):
    """model_fn(x_t, t) -> the exact eps / x0 / v prediction for x0 ~ N(mu, s^2), x_t shaped (N, d)."""
    def fn(x, t):
        a = sched.alphas_cumprod[t.cpu()].view(-1, 1)
        x64 = x.double()
        var = a * s ** 2 + 1 - a
        x0 = mu + a.sqrt() * s ** 2 / var * (x64 - a.sqrt() * mu)
        eps = (1 - a).sqrt() / var * (x64 - a.sqrt() * mu)
        out = {"eps": eps, "x0": x0, "v": a.sqrt() * eps - (1 - a).sqrt() * x0}[prediction]
        return out.to(x.dtype)
    return fn


def gaussian_x_T(sched, t_first, n, seed):
    """An exact sample of q(x_t) at t = t_first (float32, (n, d)) and the level abar_t."""
    g = torch.Generator().manual_seed(seed)
    a = sched.alphas_cumprod[t_first]
    x0 = MU + S * torch.randn(n, MU.numel(), generator=g, dtype=torch.float64)
    x_T = a.sqrt() * x0 + (1 - a).sqrt() * torch.randn(n, MU.numel(), generator=g, dtype=torch.float64)
    return x_T.float(), a


def exact_flow(x, a, b):
    """The probability-flow ODE's exact map from level abar = a to level b: it keeps the standardised
    value (x - sqrt(a) mu) / sqrt(Var x_a) of every sample."""
    return b.sqrt() * MU + ((b * S ** 2 + 1 - b) / (a * S ** 2 + 1 - a)).sqrt() * (x.double() - a.sqrt() * MU)


# ------------------------------------------------------------------------------ schedules

def test_schedule_formulas():
    T = 1000
    sl = Schedule.make("scaled_linear", T, 0.00085, 0.012)
    ref = torch.tensor([(math.sqrt(0.00085) + i * (math.sqrt(0.012) - math.sqrt(0.00085)) / (T - 1)) ** 2
                        for i in range(T)], dtype=torch.float64)
    assert sl.betas.dtype == torch.float64 and sl.alphas_cumprod.dtype == torch.float64
    torch.testing.assert_close(sl.betas, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(sl.alphas_cumprod[10], torch.prod(1 - ref[:11]), rtol=1e-12, atol=0)
    lin = Schedule.make("linear", 500, 1e-4, 0.02)
    assert lin.num_timesteps == 500 and lin.betas[0].item() == pytest.approx(1e-4, rel=1e-12)
    assert lin.betas[-1].item() == pytest.approx(0.02, rel=1e-12)
    assert lin.betas[1].item() == pytest.approx(1e-4 + (0.02 - 1e-4) / 499, rel=1e-12)
    # cosine: Nichol & Dhariwal eq. 17, betas = 1 - abar(t+1)/abar(t) clipped at 0.999
    cos = Schedule.make("cosine", T)
    f = lambda t: math.cos((t / T + 0.008) / 1.008 * math.pi / 2) ** 2
    for t in (0, 1, 500, 998, 999):
        want = min(1 - f(t + 1) / f(t), 0.999)
        assert cos.betas[t].item() == pytest.approx(want, rel=1e-10)
    assert cos.betas[-1].item() == pytest.approx(0.999)
    assert cos.alphas_cumprod[400].item() == pytest.approx(f(401) / f(0), rel=1e-9)
    # presets
    torch.testing.assert_close(Schedule.sd15().betas, sl.betas)
    torch.testing.assert_close(Schedule.from_config(ModelConfig()).alphas_cumprod, sl.alphas_cumprod)
    with pytest.raises(ValueError, match="scaled_linear, linear, cosine"):
        Schedule.make("quadratic")


def test_schedule_matches_diffusers_sd15():
    from diffusers import DDIMScheduler
    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    torch.testing.assert_close(Schedule.sd15().alphas_cumprod.float(), ref.alphas_cumprod, rtol=2e-5, atol=1e-7)


@pytest.mark.parametrize("kind", ["scaled_linear", "linear", "cosine"])
def test_zero_terminal_snr(kind):
    base = Schedule.make(kind, 1000, 0.00085, 0.012)
    z = Schedule.make(kind, 1000, 0.00085, 0.012, zero_terminal_snr=True)
    assert z.alphas_cumprod[-1].item() == 0.0
    assert z.betas[-1].item() == pytest.approx(1.0)
    assert z.alphas_cumprod[0].item() == pytest.approx(base.alphas_cumprod[0].item(), rel=1e-12)
    assert bool((z.alphas_cumprod[1:] < z.alphas_cumprod[:-1]).all())
    # Lin et al. Alg. 1: sqrt(abar) is an affine map of the original sqrt(abar)
    s0, sT = base.sqrt_alphas_cumprod[0], base.sqrt_alphas_cumprod[-1]
    torch.testing.assert_close(z.sqrt_alphas_cumprod, (base.sqrt_alphas_cumprod - sT) * s0 / (s0 - sT),
                               rtol=1e-9, atol=1e-12)
    assert z.snr(torch.tensor([999])).item() == 0.0


# ------------------------------------------------------------------------- parameterisations

@pytest.mark.parametrize("shape", [(5, 3, 4, 4), (2, 3, 2, 4, 4)])
def test_conversions_roundtrip(shape):
    sched = Schedule.sd15()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(shape, generator=g, dtype=torch.float64)
    eps = torch.randn(shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 999, 500, 37, 1][:shape[0]])
    x_t = sched.q_sample(x0, t, eps)
    a = sched.alphas_cumprod[t].view(-1, *[1] * (len(shape) - 1))
    torch.testing.assert_close(x_t, a.sqrt() * x0 + (1 - a).sqrt() * eps)
    assert extract(sched.alphas_cumprod, t, x0).shape == (shape[0],) + (1,) * (len(shape) - 1)
    v = sched.from_x0_eps(x0, eps, t, "v")
    torch.testing.assert_close(v, a.sqrt() * eps - (1 - a).sqrt() * x0)  # Salimans & Ho: v = alpha eps - sigma x0
    for p in ("eps", "v", "x0"):
        pred = sched.from_x0_eps(x0, eps, t, p)
        x0_b, eps_b = sched.to_x0_eps(pred, x_t, t, p)
        torch.testing.assert_close(x0_b, x0, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(eps_b, eps, rtol=1e-9, atol=1e-9)
        for q in ("eps", "v", "x0"):
            back = sched.convert(sched.convert(pred, x_t, t, p, q), x_t, t, q, p)
            torch.testing.assert_close(back, pred, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="eps, v, x0"):
        sched.to_x0_eps(x0, x_t, t, "score")


def test_min_snr_weights():
    sched = Schedule.sd15()
    t = torch.tensor([10, 300, 999])
    snr = sched.alphas_cumprod[t] / (1 - sched.alphas_cumprod[t])
    torch.testing.assert_close(sched.snr(t), snr)
    assert snr[0] > 5 > snr[1]                      # one timestep each side of gamma
    g = 5.0
    torch.testing.assert_close(min_snr_weight(snr, g, "eps"), torch.stack([g / snr[0], torch.tensor(1.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64)]))
    torch.testing.assert_close(min_snr_weight(snr, g, "x0"), torch.stack([torch.tensor(g, dtype=torch.float64), snr[1], snr[2]]))
    torch.testing.assert_close(min_snr_weight(snr, g, "v"), torch.minimum(snr, torch.tensor(g, dtype=torch.float64)) / (snr + 1))
    assert min_snr_weight(snr, g, "v")[0].item() == pytest.approx(g / (snr[0].item() + 1))
    z = Schedule.make(zero_terminal_snr=True)       # SNR = 0 at t = 999: finite weights
    w = min_snr_weight(z.snr(torch.tensor([999])), g, "eps")
    assert w.item() == 1.0 and min_snr_weight(z.snr(torch.tensor([999])), g, "v").item() == 0.0


# ---------------------------------------------------------------------------------- training

def _true_target_model(sched, x0, prediction):
    def fn(x_t, t):
        a = extract(sched.alphas_cumprod, t, x_t)
        eps = (x_t - a.sqrt() * x0) / (1 - a).sqrt()
        return sched.from_x0_eps(x0, eps, t, prediction)
    return fn


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
@pytest.mark.parametrize("shape", [(4, 2, 8, 8), (3, 5, 2, 4, 4)])
def test_training_loss(prediction, shape):
    sched = Schedule.sd15()
    x0 = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    loss, info = training_loss(_true_target_model(sched, x0, prediction), x0, sched, prediction,
                               generator=torch.Generator().manual_seed(1), min_snr_gamma=5.0)
    assert loss.item() < 1e-12 and info["t"].shape == (shape[0],)
    half = lambda x, t: 0.5 * x          # any fixed model: the loss then depends on t and noise only
    l1, i1 = training_loss(half, x0, sched, prediction, generator=torch.Generator().manual_seed(2))
    l2, i2 = training_loss(half, x0, sched, prediction, generator=torch.Generator().manual_seed(2))
    l3, _ = training_loss(half, x0, sched, prediction, generator=torch.Generator().manual_seed(3))
    assert l1.item() == l2.item() and torch.equal(i1["t"], i2["t"]) and l1.item() != l3.item()
    # the draw convention: t = randint(0, T, (B,)) first, then noise shaped like x0
    g = torch.Generator().manual_seed(2)
    t = torch.randint(0, 1000, (shape[0],), generator=g)
    noise = torch.randn(shape, generator=g, dtype=torch.float64)
    assert torch.equal(i1["t"], t)
    lw, iw = training_loss(half, x0, sched, prediction, t=t, noise=noise, min_snr_gamma=5.0)
    target = sched.from_x0_eps(x0, noise, t, prediction)
    mse = (0.5 * sched.q_sample(x0, t, noise) - target).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(iw["mse"], mse)
    torch.testing.assert_close(lw, (min_snr_weight(sched.snr(t), 5.0, prediction) * mse).mean())
    torch.testing.assert_close(l1, mse.mean())


def test_training_loss_per_sample_generators_and_frames():
    sched = Schedule.sd15()
    x0 = torch.zeros(3, 4, 1, 4, 4)
    seen = {}

    def model(x_t, t):
        seen["x_t"], seen["t"] = x_t, t
        return torch.zeros_like(x_t)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    _, info = training_loss(model, x0, sched, "eps", generator=gens([7, 8, 9]))
    x_all, t_all = seen["x_t"], seen["t"]
    _, info1 = training_loss(model, x0[:1], sched, "eps", generator=gens([8]))
    assert t_all[1] == seen["t"][0]
    torch.testing.assert_close(x_all[1], seen["x_t"][0])          # independent of batch composition
    torch.testing.assert_close(info["mse"][1], info1["mse"][0])
    assert not torch.allclose(x_all[0, 0], x_all[0, 1])            # noise independent per frame


# ------------------------------------------------------------------------------- timesteps / errors

def test_timesteps_and_errors():
    lead = make_timesteps(50, "leading", 1000)
    assert lead[:3] == [981, 961, 941] and lead[-1] == 1 and len(lead) == 50
    trail = make_timesteps(50, "trailing", 1000)
    assert trail[0] == 999 and trail[-1] == 19 and len(set(trail)) == 50
    lin = make_timesteps(10, "linspace", 1000)
    assert lin[0] == 999 and lin[-1] == 0 and len(lin) == 10
    for spacing in SPACINGS:
        ts = make_timesteps(7, spacing, 1000)
        assert all(a > b for a, b in zip(ts, ts[1:])) and 0 <= ts[-1] and ts[0] <= 999
    x = torch.zeros(1, 2)
    f = lambda x, t: x
    with pytest.raises(ValueError, match="ddpm, ddim, dpmpp2m"):
        sample(f, x, 10, sampler="euler")
    with pytest.raises(ValueError, match="leading, trailing, linspace"):
        sample(f, x, 10, spacing="uniform")
    for steps in (0, 1001):
        with pytest.raises(ValueError, match=r"1\.\.1000"):
            sample(f, x, steps)
    with pytest.raises(ValueError, match="steps_offset"):
        make_timesteps(1000, "leading", 1000)
    with pytest.raises(ValueError, match="one per sample"):
        sample(f, x, 10, sampler="ddpm", generator=[torch.Generator(), torch.Generator()])
    with pytest.raises(ValueError, match="zero terminal SNR"):
        sample(f, x, 10, schedule=Schedule.make(zero_terminal_snr=True), spacing="trailing")


# ----------------------------------------------------------------- samplers on Gaussian data

@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_deterministic_samplers_follow_exact_flow(prediction):
    """eta = 0 samplers discretise the probability-flow ODE, whose exact map is known here. The last
    step lands on abar_0 (set_alpha_to_one=False): a jump to abar = 1 would add the error of one
    first-order step from t = 1 whatever the number of steps. Error: mean |x - exact| / s."""
    sched = Schedule.sd15()
    errs = {}
    for sampler in ("ddim", "dpmpp2m"):
        for steps in (10, 50):
            t0 = make_timesteps(steps, "leading", 1000)[0]
            x_T, a = gaussian_x_T(sched, t0, 2000, seed=0)
            out = sample(gaussian_denoiser(sched, prediction), x_T, steps, sampler, sched, prediction,
                         set_alpha_to_one=False).double()
            errs[sampler, steps] = ((out - exact_flow(x_T, a, sched.alphas_cumprod[0])).abs().mean(0) / S).max().item()
    # measured: ddim 0.156 -> 0.037 (first order), dpmpp2m 0.132 -> 0.026 (with uniform-in-t steps,
    # lambda steps near t = 0 do not shrink, so 2M converges faster than DDIM but not as 1/S^2 here)
    assert errs["ddim", 50] < 0.05 and errs["ddim", 50] < errs["ddim", 10] / 3.5, errs
    assert errs["dpmpp2m", 50] < 0.035 and errs["dpmpp2m", 50] < errs["dpmpp2m", 10] / 4.5, errs
    assert errs["dpmpp2m", 50] < 0.8 * errs["ddim", 50], errs


@pytest.mark.parametrize("sampler,eta", [("ddpm", 0.0), ("ddim", 1.0), ("ddim", 0.5)])
def test_stochastic_samplers_match_gaussian_moments(sampler, eta):
    sched = Schedule.sd15()
    errs = {}
    for steps in (10, 100):
        t0 = make_timesteps(steps, "trailing", 1000)[0]
        x_T, _ = gaussian_x_T(sched, t0, 20000, seed=1)
        out = sample(gaussian_denoiser(sched, "eps"), x_T, steps, sampler, sched, eta=eta, spacing="trailing",
                     generator=torch.Generator().manual_seed(2), set_alpha_to_one=True).double()
        assert (out.mean(0) - MU).abs().max() < 0.05                       # the mean is preserved exactly
        errs[steps] = ((out.std(0) / S) - 1).abs().max().item()
    # measured (ddpm = ddim eta 1) 0.29 -> 0.057, (eta 0.5) 0.25 -> 0.038: the posterior variance
    # beta_tilde ignores Var[x0 | x_t], so few-step ancestral samples are under-dispersed (s = 0.5 worst)
    assert errs[100] < 0.07 and errs[100] < errs[10] / 2, errs


# the teacher samplers: lcm expects a consistency function (a sample), not this exact posterior mean,
# so on a Gaussian it is under-dispersed by design; the student's sampler is tested in test_distill.py
@pytest.mark.parametrize("sampler", [s for s in SAMPLERS if s != "lcm"])
def test_zero_terminal_snr_v_prediction_from_pure_noise(sampler):
    sched = Schedule.make("scaled_linear", zero_terminal_snr=True)
    x_T, a = gaussian_x_T(sched, 999, 20000, seed=3)
    assert a.item() == 0.0
    out = sample(gaussian_denoiser(sched, "v"), x_T, 50, sampler, sched, "v", spacing="trailing",
                 eta=0.0, generator=torch.Generator().manual_seed(0), set_alpha_to_one=True).double()
    assert torch.isfinite(out).all()
    assert (out.mean(0) - MU).abs().max() < 0.05
    assert ((out.std(0) / S) - 1).abs().max() < 0.2


def test_ddpm_equals_ddim_eta_one():
    sched = Schedule.sd15()
    x_T, _ = gaussian_x_T(sched, 981, 64, seed=4)
    f = gaussian_denoiser(sched, "eps")
    a = sample(f, x_T, 20, "ddpm", sched, generator=torch.Generator().manual_seed(5), set_alpha_to_one=True)
    b = sample(f, x_T, 20, "ddim", sched, eta=1.0, generator=torch.Generator().manual_seed(5), set_alpha_to_one=True)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_ddim_deterministic_and_invertible():
    sched = Schedule.sd15()
    f = gaussian_denoiser(sched, "eps")
    errs = {}
    for steps in (10, 50):
        x_T, _ = gaussian_x_T(sched, make_timesteps(steps, "leading", 1000)[0], 500, seed=6)
        x0 = sample(f, x_T, steps, "ddim", sched)
        assert torch.equal(x0, sample(f, x_T, steps, "ddim", sched))
        back = ddim_invert(f, x0, steps, sched)
        errs[steps] = ((back - x_T).abs().mean() / x_T.abs().mean()).item()
    # measured 0.28 -> 0.064: the round trip is first order (inversion evaluates eps at the target
    # timestep on the less noisy sample; the error is largest near t = 0 where sigma changes fastest)
    assert errs[50] < 0.1 and errs[50] < errs[10] / 3.5, errs


def test_per_sample_generators_video_batch_independent():
    sched = Schedule.sd15()
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]
    x_T = noise_like((3, 4, 2, 4, 4), gens([10, 11, 12]))
    x_T1 = noise_like((1, 4, 2, 4, 4), gens([11]))
    torch.testing.assert_close(x_T[1:2], x_T1)
    assert torch.equal(noise_like((2, 3), torch.Generator().manual_seed(0)),
                       torch.randn(2, 3, generator=torch.Generator().manual_seed(0)))

    def model(x, t):                      # a nonlinear per-sample model on (B, F, C, H, W)
        assert t.shape == (x.shape[0],) and t.dtype == torch.long
        return 0.3 * torch.tanh(x) + 0.01 * t.view(-1, 1, 1, 1, 1).float() / 1000
    for sampler, eta in (("ddpm", 0.0), ("ddim", 0.5)):
        full = sample(model, x_T, 8, sampler, sched, eta=eta, generator=gens([20, 21, 22]))
        one = sample(model, x_T1, 8, sampler, sched, eta=eta, generator=gens([21]))
        assert full.shape == x_T.shape
        torch.testing.assert_close(full[1:2], one)


# ------------------------------------------------------------------- reference implementations

def _ref_model():
    """A nontrivial deterministic eps model: the exact denoiser of N(0.3, 0.5^2) plus a smooth
    channel-mixing, t-dependent perturbation (outputs stay O(1), so 1e-5 is a meaningful bound)."""
    ac = Schedule.sd15().alphas_cumprod
    w = torch.randn(4, 4, generator=torch.Generator().manual_seed(0)) * 0.3

    def model(x, t):
        t = t.reshape(-1).expand(x.shape[0])
        a = ac[t].float().view(-1, 1, 1, 1)
        eps = (1 - a).sqrt() * (x - a.sqrt() * 0.3) / (a * 0.25 + 1 - a)
        return eps + 0.05 * torch.tanh(torch.einsum("ij,bjhw->bihw", w, x) + t.float().view(-1, 1, 1, 1) / 1000)
    return model


@pytest.mark.parametrize("eta", [0.0, 0.7])
def test_ddim_matches_diffusers_sd15(eta):
    from diffusers import DDIMScheduler
    ref = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    ref.set_timesteps(50)
    model = _ref_model()
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(5)       # our sampler draws one randn(x.shape) per step when eta > 0
    x = x_T.clone()
    for t in ref.timesteps:
        noise = torch.randn(x.shape, generator=g) if eta > 0 else None
        x = ref.step(model(x, t), t, x, eta=eta, variance_noise=noise).prev_sample
    assert ref.timesteps.tolist() == make_timesteps(50, "leading", 1000)
    calls = []
    ours = sample(lambda x, t: calls.append(t) or model(x, t), x_T, 50, "ddim", Schedule.sd15(), eta=eta,
                  generator=torch.Generator().manual_seed(5))
    assert len(calls) == 50 and x.abs().max() > 0.5
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-5)


@pytest.mark.parametrize("spacing,steps,to_one", [("trailing", 20, True), ("trailing", 10, True), ("leading", 20, True),
                                                  ("linspace", 12, True), ("trailing", 10, False), ("leading", 20, False)])
def test_dpmpp2m_matches_diffusers(spacing, steps, to_one):
    """diffusers' DPMSolverMultistepScheduler (dpmsolver++, order 2, lower_order_final, final sigma 0).
    Its own "leading"/"linspace" spacings differ from ours (they space steps + 1 points and drop the
    last), so for those our timesteps are passed to it as custom timesteps; "trailing" is compared
    with its native spacing. Its final_sigmas_type "zero" (last step to sigma = 0) is our
    set_alpha_to_one=True (the default), its "sigma_min" (to abar_0) our set_alpha_to_one=False."""
    from diffusers import DPMSolverMultistepScheduler
    ref = DPMSolverMultistepScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                      beta_schedule="scaled_linear", algorithm_type="dpmsolver++", solver_order=2,
                                      lower_order_final=True, final_sigmas_type="zero" if to_one else "sigma_min",
                                      timestep_spacing="trailing")
    if spacing == "trailing":
        ref.set_timesteps(steps)
        assert ref.timesteps.tolist() == make_timesteps(steps, "trailing", 1000)
    else:
        ref.set_timesteps(timesteps=make_timesteps(steps, spacing, 1000))
    model = _ref_model()
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    x = x_T.clone()
    for t in ref.timesteps:
        x = ref.step(model(x, t), t, x).prev_sample
    ours = sample(model, x_T, steps, "dpmpp2m", Schedule.sd15(), spacing=spacing, set_alpha_to_one=to_one)
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-5)


def test_ddpm_matches_diffusers():
    from diffusers import DDPMScheduler
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                        clip_sample=False, steps_offset=1, timestep_spacing="leading", variance_type="fixed_small")
    ref.set_timesteps(25)
    model = _ref_model()
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(4)
    x = x_T.clone()
    for t in ref.timesteps:
        x = ref.step(model(x, t), t, x, generator=g).prev_sample
    ours = sample(model, x_T, 25, "ddpm", Schedule.sd15(), generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------- guidance

OFFSET = {name: float(i + 1) for i, name in enumerate(CONDITIONS)}


def multi_model(calls):
    """model_fn_multi(x, t, cond_sets) -> (K*B, ...): a nonlinear function of x plus one offset per
    kept condition, evaluated through expand_for_sets as tools/sample.py would."""
    def fn(x, t, cond_sets):
        calls.append(len(cond_sets))
        x2, t2, keep = expand_for_sets(x, t, cond_sets)
        assert x2.shape[0] == len(cond_sets) * x.shape[0] and t2.shape == (x2.shape[0],)
        off = sum(keep[n].float().view(-1, *[1] * (x.dim() - 1)) * OFFSET[n] for n in CONDITIONS)
        scale = 1 + 0.1 * t2.float().view(-1, *[1] * (x.dim() - 1)) / 1000 + 0.2 * off   # conditions change the spread
        return torch.tanh(x2) * scale + off
    return fn


def single(x, t, names):
    return multi_model([])(x, t, [frozenset(names)])


def test_guidance_scales():
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.full((3,), 500)
    given = ("text", "mask", "sketch")
    calls = []
    u, c = single(x, t, ()), single(x, t, given)
    torch.testing.assert_close(guided(multi_model(calls), "0", given=given)(x, t), u)
    torch.testing.assert_close(guided(multi_model(calls), 1.0, given=given)(x, t), c)
    torch.testing.assert_close(guided(multi_model(calls), "7.5", given=given)(x, t), u + 7.5 * (c - u))
    assert calls == [2, 2, 2]                                    # one batched call each
    # compositional with one condition == single scale with that condition as the only one given
    one = guided(multi_model(calls), "mask=3", given=given)(x, t)
    torch.testing.assert_close(one, guided(multi_model(calls), 3.0, given=("mask",))(x, t))
    # compositional sum, groups
    fn = guided(multi_model(calls), GuidanceSpec.parse("mask=2,text+sketch=0.5"), given=given)
    want = u + 2 * (single(x, t, ["mask"]) - u) + 0.5 * (single(x, t, ["text", "sketch"]) - u)
    torch.testing.assert_close(fn(x, t), want)
    assert fn.cond_sets == [frozenset(), frozenset({"mask"}), frozenset({"text", "sketch"})]
    with pytest.raises(GuidanceError, match="flow"):
        guided(multi_model(calls), "flow=2", given=given)


def test_guidance_rescale():
    x = torch.randn(2, 3, 5, 4, 4, generator=torch.Generator().manual_seed(1))     # video shape
    t = torch.full((2,), 100)
    calls = []
    c = single(x, t, CONDITIONS)
    out = guided(multi_model(calls), 5.0, rescale=1.0)(x, t)
    torch.testing.assert_close(out.flatten(1).std(1), c.flatten(1).std(1))
    plain = guided(multi_model(calls), 5.0)(x, t)
    assert (plain.flatten(1).std(1) > 1.5 * c.flatten(1).std(1)).all()          # CFG inflates the std here
    half = guided(multi_model(calls), 5.0, rescale=0.5)(x, t)
    torch.testing.assert_close(half, 0.5 * out + 0.5 * plain)
    comp = guided(multi_model(calls), "mask=3,text=2", rescale=1.0)            # positive = union of sets
    assert comp.cond_sets[-1] == frozenset({"mask", "text"})
    torch.testing.assert_close(comp(x, t).flatten(1).std(1), single(x, t, ["mask", "text"]).flatten(1).std(1))
    assert calls[-1] == 4


def test_guidance_spec_parse_errors():
    spec = GuidanceSpec.parse("mask=2, text=1")
    assert spec.compositional and spec.terms == ((frozenset({"mask"}), 2.0), (frozenset({"text"}), 1.0))
    assert GuidanceSpec.parse("3") == GuidanceSpec(scale=3.0)
    with pytest.raises(GuidanceError) as e:
        GuidanceSpec.parse("mask=2,colour=1")
    assert "colour" in str(e.value) and all(n in str(e.value) for n in CONDITIONS)
    for bad in ("mask", "mask=x", "mask=1,mask=2", "", "mask=1,,text=2"):
        with pytest.raises(GuidanceError):
            GuidanceSpec.parse(bad)


def test_guided_sampling_one_call_per_step():
    calls = []
    x_T = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    out = sample(multi_model(calls), x_T, 12, "dpmpp2m", Schedule.sd15(), guidance="mask=2,text=1")
    assert calls == [3] * 12 and torch.isfinite(out).all()
    calls.clear()
    sample(multi_model(calls), x_T, 7, "ddim", Schedule.sd15(), guidance=GuidanceSpec.parse("4"))
    assert calls == [2] * 7
    # keep masks and repeats, set-major
    x2, t2, keep = expand_for_sets(x_T, torch.tensor([5, 6]), [frozenset(), frozenset({"mask"})])
    assert keep["mask"].tolist() == [False, False, True, True] and keep["text"].tolist() == [False] * 4
    assert t2.tolist() == [5, 6, 5, 6]
    assert repeat_sets(["a", "b"], 2) == ["a", "b", "a", "b"]
