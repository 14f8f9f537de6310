"""Latent consistency distillation with the guidance built in: a stage-1, stage-2 or cmr checkpoint
(the teacher) becomes a student that samples in 1-4 steps, one UNet evaluation per step, whatever
the guidance (`bash train.sh distill --init=RUN`, then `tools/sample.py --sampler=lcm --steps=1..4`).

Why this method. The teacher's cost is its step count times its guided set: 50 DDIM steps x (1 + the
number of guided conditions) UNet calls. Two known distillations remove both factors and keep a
teacher's controls: guidance distillation (Meng et al., CVPR 2023, "On Distillation of Guided
Diffusion Models") feeds the guidance scale to the student as an input, so one evaluation replaces
the guided pair; latent consistency distillation (Luo et al. 2023, LCM; AnimateLCM, Wang et al. 2024,
for video) folds both into ONE training run: each example costs one batched teacher call and two
student calls, the student keeps the teacher's network, latent space and parameterisation, and
samples in 1-4 steps. Meng et al.'s second stage (progressive distillation, ~log2(50) rounds, each a
full training) and distribution-matching or adversarial distillations (a second score network or a
discriminator) cost more and fit the project's one-loop trainer less well. The student is an
ordinary HeartBeat checkpoint: the teacher's model plus a guidance embedding (heartbeat/unet.py,
`guidance_embed`, zero-initialised, so the student starts as the teacher's conditional model).

What is implemented (z latents, abar_t the teacher's schedule, x0(.) / eps(.) the teacher's
prediction converted by Schedule.to_x0_eps; K the sample's kept conditions):

 (1) guidance as input (Meng et al. §3.1, w-conditioning; LCM §4.2, the w-augmented PF-ODE), with
     HeartBeat's guidance (heartbeat/guidance.py: Ho & Salimans eq. 6 and Liu et al. §3) as the
     teacher's: the student takes g = (w, w_1, ..., w_n), a joint scale and one per condition c_i of
     the model, and learns the teacher's
         eps~ = eps(0) + w [eps(K) - eps(0)] + sum_i w_i [eps(K n {c_i}) - eps(0)]
     from ONE batched teacher call over the 2 + n condition sets 0, K, K n {c_1}, ..., K n {c_n}
     (`teacher_sets`, `guided_teacher`), of which only the pairs with a non-zero scale run
     (`needed_sets`: about half of them). A single scale is (w, 0, ...), per-condition scales (0,
     w_1, ...); group terms ("mask+sketch=2") stay the teacher's. Training draws w, w_i ~ U[0,
     guidance_max], one of the two forms per example (`draw_guidance`).
 (2) one teacher ODE step from t_{n+k} to t_n (LCM eq. for the LCD target, solved by DDIM eq. 12
     with eta = 0):  z^_{t_n} = sqrt(abar_{t_n}) x0~ + sqrt(1 - abar_{t_n}) eps~, on the skipping
     schedule t_j = (j + 1) k - 1 of N = T / k timesteps (LCM §4.3, k = T / 50: `draw_timesteps`).
 (3) the consistency function (Song et al. 2023, CM §3; LCM §4.1; heartbeat.diffusion.consistency):
         f_theta(z, g, c, t) = c_skip(t) z + c_out(t) x0_theta(z, g, c, t),  f(z, 0) = z.
 (4) the LCD loss (LCM Algorithm 1):
         L = E || f_theta(z_{t_{n+k}}, g, c, t_{n+k}) - f_theta-(z^_{t_n}, g, c, t_n) ||_2^2
     with theta- = stopgrad(theta): the target network's EMA decay 0 of Song & Dhariwal 2023
     (iCT, §3.2), which also keeps resume exact without a third network. The training EMA is kept
     for sampling as in every stage.
 (4') `--lcd_loss=huber`: iCT's pseudo-Huber metric (§3.3) in place of the squared L2 norm,
         d(a, b) = sqrt(||a - b||_2^2 + c^2) - c,   c = 0.00054 sqrt(dim),  dim = elements per example,
     which weighs large residuals less than L2 (BENCHMARKS.md compares the two).
Sampling is LCM Algorithm 3 (heartbeat.diffusion.sample, sampler "lcm").

Every condition subset: each example keeps a random subset drawn by the teacher's own dropout
(Conditioner.sample_keep: each condition and all at once), and the conditioner is the teacher's and
stays frozen, so "absent" is exactly the training representation (docs/ARCHITECTURE.md §Conditions);
the scales of conditions an example drops are zeroed (their terms vanish in (1) anyway).

Stage 2 (and cmr): temporal coherence. Step (2) is taken on whole clips by the video teacher, its
temporal attention included, and the loss (4) compares whole clips, so the student is distilled from
the teacher's joint distribution of the frames, never frame by frame; the flow condition stays a
guided condition like any other. `heartbeat.metrics.warp_error` (tools/eval.py `warp_err`) measures
what survives. AnimateLCM's decoupled distillation (Wang et al. 2024, §3: distil the image model
first, then keep its spatial weights and distil only the temporal layers from the video teacher) is
`--spatial=RUN`, RUN a student of the stage-1 teacher (heartbeat.runs.load_spatial_student): the
video student starts from that student's spatial UNet weights and learns its temporal layers (and
guidance embedding, whose columns for the video's new conditions start at zero) by (4) on clips.
`--student=RUN` (heartbeat.runs.load_student) starts a student from all the UNet weights of RUN, a
student of a teacher of the same stage (say such a `--spatial` run), and trains them all by (4): a
joint phase after the decoupled one, in which the spatial layers may follow the video teacher too.
"""
from __future__ import annotations

import torch

from .diffusion import Schedule, consistency, extract, noise_like
from .guidance import GuidanceError, GuidanceSpec


class StudentError(ValueError):
    """A request a distilled student cannot serve (wrong sampler, steps or guidance)."""


def teacher_sets(conditions) -> list[frozenset]:
    """The condition sets of the teacher's batched call: none, all kept, then each condition alone."""
    return [frozenset(), frozenset(conditions)] + [frozenset({c}) for c in conditions]


def draw_guidance(keep: dict, conditions, w_max: float, generators) -> torch.Tensor:
    """(B, 1 + n) student scales, one row per example from its own generator: with probability 1/2
    a joint scale (w, 0, ...), else per-condition scales (0, w_1, ...), each U[0, w_max]; the scales
    of conditions the example drops are 0."""
    rows = []
    for b, g in enumerate(generators):
        u = torch.rand(2 + len(conditions), generator=g)
        if u[0] < 0.5:
            row = [float(u[1]) * w_max] + [0.0] * len(conditions)
        else:
            row = [0.0] + [float(u[2 + i]) * w_max * float(keep[c][b]) for i, c in enumerate(conditions)]
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float32)


def needed_sets(g: torch.Tensor) -> torch.Tensor:
    """(2 + n, B) bool: the (set, example) pairs of teacher_sets() that equation (1) weighs. Set 0 (the
    unconditional u) always; set 1 and set 1 + i only where their scale is non-zero. The others would
    be multiplied by 0, so the teacher skips them: an example drawn with a joint scale needs 2 of the
    2 + n sets, one with per-condition scales 1 + (its kept conditions)."""
    need = torch.ones(g.shape[1] + 1, g.shape[0], dtype=torch.bool, device=g.device)
    need[1:] = g.T != 0
    return need


def guided_teacher(preds: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Equation (1): preds (2 + n, B, ...) over teacher_sets(), g (B, 1 + n) -> the guided (B, ...)."""
    u = preds[0]
    w = g.to(preds.dtype).T.reshape(g.shape[1], g.shape[0], *([1] * (preds.dim() - 2)))   # (1 + n, B, 1, ...)
    return u + (w * (preds[1:] - u)).sum(0)


def draw_timesteps(generators, T: int, skip: int = 0, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(t_{n+k}, t_n) per example on LCM's skipping schedule (j ~ U{0..N-1}, t = (j + 1) k - 1,
    t_n = max(t - k, 0))."""
    k = int(skip) or max(1, T // 50)
    N = T // k
    j = torch.cat([torch.randint(0, N, (1,), generator=g) for g in generators])
    t = (j + 1) * k - 1
    return t.to(device), (t - k).clamp(min=0).to(device)


def lcd_loss(student_fn, teacher_fn, z0: torch.Tensor, schedule: Schedule, g: torch.Tensor, generators,
             prediction: str = "eps", skip: int = 0, loss: str = "l2"):
    """Equations (1)-(4) for one batch. student_fn(z, t) -> the student's prediction (its scales g and
    contexts bound); teacher_fn(z, t) -> the teacher's (2 + n, B, ...) predictions over teacher_sets.
    Draws, per example from its generator, the timestep then the noise. Returns (loss, info)."""
    t, s = draw_timesteps(generators, schedule.num_timesteps, skip, device=z0.device)
    noise = noise_like(z0.shape, generators, device=z0.device, dtype=z0.dtype)
    z_t = schedule.q_sample(z0, t, noise)
    with torch.no_grad():
        guided = guided_teacher(teacher_fn(z_t, t).float(), g)                       # (1)
        x0, eps = schedule.to_x0_eps(guided, z_t, t, prediction)
        z_s = extract(schedule.sqrt_alphas_cumprod, s, z_t) * x0 \
            + extract(schedule.sqrt_one_minus_alphas_cumprod, s, z_t) * eps          # (2) DDIM eq. 12
        target = consistency(schedule, student_fn(z_s, s).float(), z_s, s, prediction)   # (3) at theta-
    f = consistency(schedule, student_fn(z_t, t).float(), z_t, t, prediction)         # (3)
    d2 = (f - target).pow(2).flatten(1)
    mse = d2.mean(1)                                                                  # (4)
    per = mse
    if loss == "huber":       # (4') pseudo-Huber, c = 0.00054 sqrt(dim) (iCT, Song & Dhariwal 2023, §3.3)
        c = 0.00054 * d2.shape[1] ** 0.5
        per = (d2.sum(1) + c * c).sqrt() - c
    return per.mean(), {"t": t, "mse": mse.detach()}


def student_scales(cfg_model, spec: GuidanceSpec) -> list[float]:
    """The (1 + n) scales of `spec` for a student of cfg_model, checked against what it learned."""
    try:
        vec = spec.student_vector(tuple(cfg_model.conditions))
    except GuidanceError as e:
        raise StudentError(str(e)) from None
    bad = [w for w in vec if not 0.0 <= w <= cfg_model.guidance_max]
    if bad:
        raise StudentError(f"guidance {bad[0]:g} is outside 0..{cfg_model.guidance_max:g}, the scales this student "
                           f"was distilled for; choose a scale in that range or sample the teacher")
    return vec


def check_request(cfg_model, sampler: str, steps: int) -> None:
    """One clear message when a sampler / step count does not fit the checkpoint (student or not)."""
    student = cfg_model.guidance_inputs > 0
    if sampler == "lcm" and not student:
        raise StudentError("--sampler=lcm samples a distilled student; this checkpoint is a teacher: distil it "
                           "with `bash train.sh distill --init=RUN`, or use ddim / dpmpp2m / ddpm")
    if student and sampler != "lcm":
        raise StudentError(f"this checkpoint is a distilled student: sample it with --sampler=lcm --steps=1.."
                           f"{cfg_model.student_steps} (not {sampler})")
    if student and not 1 <= steps <= cfg_model.student_steps:
        raise StudentError(f"--steps={steps}: this student was distilled for 1..{cfg_model.student_steps} steps")
