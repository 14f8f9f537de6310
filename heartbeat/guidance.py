"""Classifier-free guidance with one scale or one scale per condition, as one batched model call.

Single scale (Ho & Salimans 2021, eq. 6, eps~ = (1 + w') eps(c) - w' eps(none), with w = 1 + w'):
    pred = pred(none) + w (pred(all given) - pred(none))      (w = 1: conditional, w = 0: unconditional)
Compositional (Liu et al. 2022, "Compositional Visual Generation", §3, concept conjunction):
    pred = pred(none) + sum_k w_k (pred(c_k) - pred(none))
with c_k a condition or a group of conditions ("mask+sketch"). Both are affine combinations whose
weights sum to 1, so combining eps, v or x0 predictions gives the same sampler input: the guided
prediction is formed in the model's own parameterisation. Optional guidance rescale (Lin et al.
2024, §3.4 and Algorithm 2) matches the per-sample std of the guided prediction to the positive one:
    x_rescaled = x_cfg * std(x_pos) / std(x_cfg);  x_final = phi x_rescaled + (1 - phi) x_cfg
(in the model's parameterisation, v in Lin et al.; x_pos is the all-given prediction, or for
compositional guidance the prediction given the union of the guided conditions).

Spec strings (tools/sample.py --guidance):
    "3.0"                      single scale, cond set = every given condition
    "mask=2,text=1"            compositional, one scale per condition
    "mask+sketch=2,text=1.5"   a group of conditions shares one term
Names come from heartbeat.config.CONDITIONS; anything else is an error listing the valid names.

How a caller evaluates `model_fn_multi(x_t, t, cond_sets)` (cond_sets: a list of K frozensets of
condition names; cond_sets[0] is always the empty set = unconditional): stack the batch K times,
set-major, and give the Conditioner keep[name][k * B + b] = (name in cond_sets[k]); conditions absent
from the batch are dropped whatever keep says. Return the predictions shaped (K * B, ...) in that
order (or (K, B, ...)). `expand_for_sets` builds x, t and keep; `repeat_sets` repeats a condition:

    def model_fn_multi(z, t, cond_sets):
        z2, t2, keep = expand_for_sets(z, t, cond_sets)
        cond = {k: repeat_sets(v, len(cond_sets)) for k, v in batch.items()}
        return unet(z2, t2, **conditioner(cond, keep))

    x0 = sample(guided(model_fn_multi, GuidanceSpec.parse("mask=2,text=1")), x_T, ...)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

from .config import CONDITIONS


class GuidanceError(ValueError):
    """A malformed guidance spec; the message lists the valid choices."""


@dataclass(frozen=True)
class GuidanceSpec:
    """scale: single-scale CFG weight (None for compositional); terms: ((condition set, weight), ...)."""
    scale: float | None = None
    terms: tuple = ()

    @staticmethod
    def parse(text: str | float, valid: Sequence[str] = CONDITIONS) -> "GuidanceSpec":
        if isinstance(text, (int, float)):
            return GuidanceSpec(scale=float(text))
        text = str(text).strip()
        try:
            return GuidanceSpec(scale=float(text))
        except ValueError:
            pass
        terms, seen = [], set()
        for item in (s.strip() for s in text.split(",")):
            name, eq, val = item.partition("=")
            if not item or not eq:
                raise GuidanceError(f"guidance spec {text!r}: expected a number (e.g. 3.0) or name=scale pairs "
                                    f"(e.g. mask=2,text=1) with names from {', '.join(valid)}")
            names = [n.strip() for n in name.split("+")]
            bad = [n for n in names if n not in valid]
            if bad:
                raise GuidanceError(f"guidance spec {text!r}: unknown condition(s) {', '.join(bad)}; "
                                    f"valid: {', '.join(valid)}")
            dup = seen.intersection(names)
            if dup:
                raise GuidanceError(f"guidance spec {text!r}: condition(s) {', '.join(sorted(dup))} appear twice")
            seen.update(names)
            try:
                w = float(val)
            except ValueError:
                raise GuidanceError(f"guidance spec {text!r}: scale {val!r} of {name} is not a number") from None
            terms.append((frozenset(names), w))
        return GuidanceSpec(terms=tuple(terms))

    @property
    def compositional(self) -> bool:
        return self.scale is None

    def student_vector(self, conditions: Sequence[str]) -> list[float]:
        """The scales a distilled student takes (heartbeat/distill.py): [w_joint, w_c for c in
        `conditions`]. A single scale w is [w, 0, ...]; per-condition scales are [0, w_c, ...]. A group
        term ("mask+sketch=2") has no such form."""
        if not self.compositional:
            return [self.scale] + [0.0] * len(conditions)
        out = [0.0] * (1 + len(conditions))
        for names, w in self.terms:
            if len(names) != 1:
                raise GuidanceError(f"a distilled student takes one scale or one per condition; the group "
                                    f"{'+'.join(sorted(names))} needs the teacher (sample its checkpoint instead)")
            (name,) = names
            if name not in conditions:
                raise GuidanceError(f"guidance names {name}, which this model was not trained with "
                                    f"({', '.join(conditions)})")
            out[1 + list(conditions).index(name)] = w
        return out

    def cond_sets(self, given: Iterable[str] | None = None) -> list[frozenset]:
        """The condition sets to evaluate, the empty (unconditional) set first. `given`: the conditions
        the caller has (default: all CONDITIONS; absent ones are dropped by the Conditioner anyway)."""
        given = frozenset(CONDITIONS if given is None else given)
        if not self.compositional:
            return [frozenset(), given]
        for names, _ in self.terms:
            if not names <= given:
                raise GuidanceError(f"guidance names {', '.join(sorted(names - given))} but only "
                                    f"{', '.join(sorted(given)) or 'no condition'} is given")
        return [frozenset()] + [names for names, _ in self.terms]


def combine(preds: torch.Tensor, spec: GuidanceSpec, pos: torch.Tensor | None = None,
            rescale: float = 0.0) -> torch.Tensor:
    """preds: (K, B, ...) predictions in the order of spec.cond_sets(); the guided (B, ...) prediction."""
    u = preds[0]
    if not spec.compositional:
        out = u + spec.scale * (preds[1] - u)                               # CFG, Ho & Salimans eq. 6 (w = 1 + w')
        pos = preds[1] if pos is None else pos
    else:
        out = u.clone()
        for k, (_, w) in enumerate(spec.terms, start=1):
            out = out + w * (preds[k] - u)                                  # Liu et al. §3, conjunction
    if rescale > 0:
        if pos is None:
            raise ValueError("guidance rescale needs the positive prediction")
        dims = tuple(range(1, out.dim()))
        std_pos = pos.std(dim=dims, keepdim=True)                           # Lin et al. §3.4: std of pos and cfg
        std_cfg = out.std(dim=dims, keepdim=True)
        rescaled = out * (std_pos / std_cfg)                                # rescale to the positive std
        out = rescale * rescaled + (1 - rescale) * out                      # blend with phi = rescale
    return out


def guided(model_fn_multi: Callable, spec: GuidanceSpec | str | float, rescale: float = 0.0,
           given: Iterable[str] | None = None) -> Callable:
    """A model_fn(x_t, t) for the samplers that makes ONE call model_fn_multi(x_t, t, cond_sets) per
    step (see the module docstring for the contract) and combines the predictions. The sets it asks
    for are in `.cond_sets` of the returned function."""
    if not isinstance(spec, GuidanceSpec):
        spec = GuidanceSpec.parse(spec)
    sets = spec.cond_sets(given)
    pos_index = None
    if rescale > 0 and spec.compositional:
        union = frozenset().union(*sets)                                    # the positive prediction
        if union not in sets:
            sets = sets + [union]
        pos_index = sets.index(union)
    K = len(sets)

    def model_fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        B = x_t.shape[0]
        out = model_fn_multi(x_t, t, sets)
        out = out.reshape(K, B, *x_t.shape[1:])                             # set-major
        pos = out[pos_index] if pos_index is not None else None
        return combine(out, spec, pos=pos, rescale=rescale)

    model_fn.cond_sets = sets
    model_fn.spec = spec
    return model_fn


def expand_for_sets(x_t: torch.Tensor, t: torch.Tensor, cond_sets: Sequence[frozenset],
                    names: Sequence[str] = CONDITIONS):
    """(x (K*B, ...), t (K*B,), keep {name: bool (K*B,)}) for one batched call over K condition sets,
    set-major: row k*B + b is sample b under cond_sets[k]; keep[name] = name in cond_sets[k]."""
    K, B = len(cond_sets), x_t.shape[0]
    x = torch.cat([x_t] * K)
    tt = torch.as_tensor(t, device=x_t.device).reshape(-1).expand(B).repeat(K)
    keep = {n: torch.tensor([n in s for s in cond_sets], device=x_t.device).repeat_interleave(B) for n in names}
    return x, tt, keep


def repeat_sets(value, K: int):
    """A condition batch repeated K times set-major (tensors along dim 0, lists by concatenation)."""
    if value is None:
        return None
    if torch.is_tensor(value):
        return torch.cat([value] * K)
    if isinstance(value, (list, tuple)):
        return type(value)(list(value) * K)
    raise TypeError(f"cannot repeat a condition of type {type(value).__name__}")
