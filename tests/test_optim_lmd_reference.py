"""LMD against an independent float64 transcription of its documented rule (issue 20 item 12).

``ReferenceLMD`` is written from the ``LMD`` class docstring, the README's optimizer section and
RESEARCH.md §1, one tensor at a time in float64, and shares no code with the implementation.
Two inputs are taken as given rather than re-derived, because they are random streams whose
statistics ``tests/test_optim_lmd.py`` checks on its own:

* the sampling noise ``xi+-``: the counter-based generator keyed by (seed, parameter index,
  step), as the docstring states. The reference builds the sample from it and every step
  compares that sample with what ``sample_()`` wrote, so a wrong key or a wrong sample
  formula fails here instead of being absorbed;
* the initial draws of ``init="moment_matched"`` / ``"abs_pair"``: the reference starts from
  the medians a twin optimizer (same seed, same weights) created, after checking that they
  have the documented form (``log m0 + init_sigma * zeta``; ``|s * zeta| + 1e-5``).

The AdamW rule of 1-D / all-zero tensors is compared with ``torch.optim.AdamW`` in float64.

**Tolerances.** The implementation runs in fp32. A log-median ``l`` (mostly |l| <= 4 nats
here) loses at most half an ulp, 2.4e-7 nats, per rounding; a step rounds about 4 times
(difference, product with the decay, sum with the sign, product with lr and subtraction), so 30
steps stay within 30 * 4 * 2.4e-7 = 2.9e-5 nats: ``LOG_TOL = 3e-5`` (measured worst: 5.5e-6
eager, 1.2e-6 compiled). A weight ``m+ e^a - m- e^b`` then differs by at most
``(m+ + m-) * (LOG_TOL + 2 fp32 roundings of exp)``, which ``assert_weights`` checks element-wise
(plus 1e-12 absolute for exact zeros). A sign ``sign(u)`` must not flip from rounding alone:
each run asserts that every nonzero momentum (or Lion interpolation) it took a sign of stayed
above ``SIGN_MARGIN`` = 1e-6 of the largest |u| or |v| of that tensor and step, 8x the fp32
error of the EMA (about 2 ulp of that largest value, 1.2e-7). The mutations these tests must
catch move a log-median by >= 1e-4 nats per step (the decay's sign: 2 lr lambda |l - log m_ref|)
or flip signs (each flip moves it by 2 lr = 0.02 nats).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from lightning_lowprec import LMD
from lightning_lowprec.optim.counter_rng import derive_keys, normal_pair
from lightning_lowprec.optim.lmd import _PURPOSE_SAMPLE

LOG_TOL = 3e-5
SIGN_MARGIN = 1e-6
EXP_REL = 2.4e-7  # two fp32 roundings of an exp, relative
ABS_PAIR_FLOOR = 1e-5
FP32_MAX = torch.finfo(torch.float32).max
DEFAULTS = dict(
    lr=1e-2, momentum=0.9, sigma=0.05, weight_decay=0.1, m_ref=1.0, init="from_weights",
    init_sigma=0.5, sign_beta=None, separate_momentum=False, point_estimate="median",
    noise="irwin_hall", adamw="auto", adamw_lr_ratio=0.3, adamw_betas=(0.9, 0.999), eps=1e-8,
)
"""LMD's documented defaults (its Args section)."""


def sign(x: torch.Tensor) -> torch.Tensor:
    """-1, 0 or +1 (sign(0) = 0: a momentum that is exactly zero moves nothing)."""
    return (x > 0).double() - (x < 0).double()


class ReferenceLMD:
    """LMD's docstring, literally, in float64, one tensor at a time.

    ``groups``: list of ``(params, options)`` as LMD's param groups (options over DEFAULTS).
    ``initial``: for random inits, ``{param index: (log m+, log m-)}`` taken from a twin.
    """

    def __init__(self, groups, seed, initial=None):
        self.seed = seed
        self.sign_margin = math.inf
        self.clamped = 0  # how many medians a bound stopped in a step (not at init)
        self.groups = []
        self.tensors = []  # flat, in LMD's parameter order: the index that keys the noise
        for params, options in groups:
            group = {**DEFAULTS, **options}
            self.groups.append(group)
            for p in params:
                self.tensors.append(self._new_tensor(p, group, len(self.tensors), initial))

    def _new_tensor(self, p, group, index, initial):
        w = p.detach().double()
        t = {"p": p, "group": group, "index": index, "steps": 0, "w": w.clone(),
             "frozen": not p.requires_grad, "adamw": False}
        if t["frozen"]:  # never sampled, never stepped
            return t
        # "1-D tensors and tensors that are all zero at their first step" go to AdamW.
        t["adamw"] = group["adamw"] == "always" or (
            group["adamw"] == "auto" and (w.ndim < 2 or not bool(w.abs().sum() > 0)))
        if t["adamw"]:
            t["weight"] = torch.nn.Parameter(w.clone())
            t["adam"] = torch.optim.AdamW([t["weight"]], foreach=False)
            return t
        s = math.sqrt(w.square().mean().item())
        if s == 0.0:  # "a tensor that is all zero uses s = 1 / sqrt(fan_in)"
            s = 1.0 / math.sqrt(math.prod(w.shape[1:]))
        e = math.exp(group["init_sigma"] ** 2)
        m0 = s / math.sqrt(2.0 * e * (e - 1.0))
        t["s"], t["m0"] = s, m0
        t["log_m_ref"] = math.log(group["m_ref"] * m0)  # m_ref is in units of m0
        if group["init"] == "from_weights":
            # m+- = (sqrt(w^2 + 4 m0^2) +- w) / 2: m+ - m- = w, m+ m- = m0^2; with "mean" the
            # point estimate is (m+ - m-) e^{sigma^2/2}, so "keeps the weights" needs w / e^...
            target = w / self._scale(group)
            root = torch.sqrt(target.square() + 4.0 * m0 * m0)
            lp, ln = ((root + target) / 2).log(), ((root - target) / 2).log()
        else:
            lp, ln = (x.double() for x in initial[index])
        low, high = self._bounds(t)  # "medians start clamped into the bounds"
        t["lp"], t["ln"] = lp.clamp(low, high), ln.clamp(low, high)
        t["u"] = torch.zeros_like(w)
        t["u_neg"] = torch.zeros_like(w)
        if group["init"] != "from_weights":  # a random init replaces the weights
            t["w"] = self._point(t)
        return t

    @staticmethod
    def _scale(group):
        return math.exp(group["sigma"] ** 2 / 2) if group["point_estimate"] == "mean" else 1.0

    def _bounds(self, t):
        lam = t["group"]["weight_decay"]
        half = 1.0 / lam if lam > 0 else math.inf  # "0 disables decay and the bounds"
        return t["log_m_ref"] - half, t["log_m_ref"] + half

    def _clamp(self, log_m, t):
        low, high = self._bounds(t)
        self.clamped += int(((log_m < low - 1e-12) | (log_m > high + 1e-12)).sum())
        return log_m.clamp(low, high)

    def _point(self, t):
        return (t["lp"].exp() - t["ln"].exp()) * self._scale(t["group"])

    def noise(self, t):
        """xi+, xi- of the sample that update ``steps + 1`` of tensor ``index`` follows."""
        keys = torch.tensor(derive_keys(self.seed, t["index"], t["steps"], _PURPOSE_SAMPLE),
                            dtype=torch.int32)
        xp, xn = normal_pair(t["w"].numel(), keys, t["group"]["noise"])
        return xp.double().view_as(t["w"]), xn.double().view_as(t["w"])

    def sample(self):
        """theta = m+ exp(sigma xi+) - m- exp(sigma xi-) for every LMD tensor (``None`` for
        AdamW ones); also remembers theta+- for the separate momentum of the next update."""
        out = []
        for t in self.tensors:
            if t["adamw"] or t["frozen"]:
                out.append(None)
                continue
            xp, xn = self.noise(t)
            sigma = t["group"]["sigma"]
            t["theta"] = ((t["lp"] + sigma * xp).exp(), (t["ln"] + sigma * xn).exp())
            out.append(t["theta"][0] - t["theta"][1])
        return out

    def weights(self):
        return [t["weight"].detach() if t["adamw"] else t["w"] for t in self.tensors]

    def _sign_of_ema(self, u, v, group):
        """u <- momentum u + (1 - momentum) v; the sign is of the new u, or Lion's
        sign(b u + (1 - b) v) taken before the update when ``sign_beta = b``."""
        b = group["sign_beta"]
        before = b * u + (1 - b) * v if b is not None else None
        u.mul_(group["momentum"]).add_((1 - group["momentum"]) * v)
        signed = before if b is not None else u
        nonzero = signed[signed != 0].abs()
        if nonzero.numel():
            scale = max(u.abs().max().item(), v.abs().max().item())
            self.sign_margin = min(self.sign_margin, nonzero.min().item() / scale)
        return sign(signed)

    def step(self, grads, sampled):
        """One update; ``grads[i]`` is ``None`` (no gradient) or a tensor (a non-finite one
        skips the tensor); ``sampled``: the gradient was taken at this step's sample."""
        for t, g in zip(self.tensors, grads, strict=True):
            # "a NaN or inf, or a finite value whose square overflows fp32" is skipped
            if g is None or not (torch.isfinite(g).all() and g.double().square().max() <= FP32_MAX):
                t.pop("theta", None)
                continue
            group, g = t["group"], g.double()
            t["steps"] += 1
            if t["adamw"]:
                adam = t["adam"].param_groups[0]
                adam.update(lr=group["lr"] * group["adamw_lr_ratio"], betas=group["adamw_betas"],
                            eps=group["eps"], weight_decay=group["weight_decay"])
                t["weight"].grad = g
                t["adam"].step()
                continue
            if group["separate_momentum"]:
                # u+ = EMA(g theta+), u- = EMA(-g theta-), theta+- of the sample the gradient
                # was taken at, else the medians themselves (sigma = 0)
                tp, tn = t["theta"] if sampled else (t["lp"].exp(), t["ln"].exp())
                cp = self._sign_of_ema(t["u"], g * tp, group)
                cn = self._sign_of_ema(t["u_neg"], -g * tn, group)
            else:  # one momentum of g: c for m+, -c for m-
                cp = self._sign_of_ema(t["u"], g, group)
                cn = -cp
            lr, lam, lmr = group["lr"], group["weight_decay"], t["log_m_ref"]
            t["lp"] = self._clamp(t["lp"] - lr * (cp + lam * (t["lp"] - lmr)), t)
            t["ln"] = self._clamp(t["ln"] - lr * (cn + lam * (t["ln"] - lmr)), t)
            t["w"] = self._point(t)
            t.pop("theta", None)


def assert_weights(actual, ref, what):
    """``actual`` (fp32) within the bound of the module doc of the reference's tensors."""
    for i, (a, t) in enumerate(zip(actual, ref.tensors, strict=True)):
        a = a.detach().double()
        if t["frozen"]:
            assert torch.equal(a, t["w"]), f"{what}: frozen tensor {i} changed"
            continue
        if t["adamw"]:
            torch.testing.assert_close(a, t["weight"].detach(), rtol=1e-5, atol=1e-7,
                                       msg=lambda m, i=i: f"{what}, AdamW tensor {i}: {m}")
            continue
        expected = ref.weights()[i] if what != "sample" else t["theta"][0] - t["theta"][1]
        size = (t["theta"][0] + t["theta"][1] if what == "sample"
                else t["lp"].exp() + t["ln"].exp()) * ReferenceLMD._scale(t["group"])
        bound = size * (LOG_TOL + EXP_REL) + 1e-12
        excess = ((a - expected).abs() - bound).max().item()
        assert excess <= 0, (f"{what}, tensor {i}: max |ours - reference| exceeds the bound by "
                             f"{excess:.3g} (max diff {(a - expected).abs().max().item():.3g})")


def assert_log_medians(opt, ref):
    """The public ``log_medians()`` against the reference's, and the documented bounds."""
    ours = dict(opt.log_medians())
    for i, t in enumerate(ref.tensors):
        if t["adamw"] or t["frozen"]:
            assert t["p"] not in ours, f"tensor {i} should be on the AdamW rule"
            continue
        lm = ours[t["p"]]
        assert lm.log_m_ref == pytest.approx(t["log_m_ref"], abs=1e-7)  # squares in fp32
        low, high = ref._bounds(t)
        assert (lm.low, lm.high) == pytest.approx((low, high), abs=1e-7)
        for name, x, y in (("log m+", lm.pos, t["lp"]), ("log m-", lm.neg, t["ln"])):
            diff = (x.double() - y).abs().max().item()
            assert diff <= LOG_TOL, f"tensor {i} {name}: {diff:.3g} nats from the reference"


def make_params(seed=0):
    """Two matrices, a 1-D tensor, an all-zero matrix, and a frozen matrix (never touched)."""
    g = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(s, generator=g) * c)
              for s, c in (((8, 24), 0.1), ((12, 6), 1.0), ((16,), 0.5), ((6, 10), 0.0))]
    with torch.no_grad():
        params[0][0, :3] = torch.tensor([0.0, 0.6, -0.6])  # zero and far-out (|w| = 5 m0)
    frozen = torch.nn.Parameter(torch.randn(3, 3, generator=g), requires_grad=False)
    return params + [frozen]


def gradient(p, t, g):
    """The step-``t`` gradient of ``p``: random, 10x at t % 9 == 0, exactly zero for every
    tensor at t = 4 and for the first 5 elements always (a momentum that stays 0)."""
    grad = torch.randn(p.shape, generator=g) * (10.0 if t % 9 == 0 else 1.0)
    if t == 4:
        grad.zero_()
    grad.view(-1)[:5] = 0.0
    return grad


CASES = {
    "defaults": {},
    "separate": {"separate_momentum": True},
    "shared-sampled": {"sigma": 0.2, "_sample": "always"},
    "separate-sampled": {"separate_momentum": True, "sigma": 0.2, "_sample": "alternate"},
    "separate-sampled-box-muller": {"separate_momentum": True, "sigma": 0.3,
                                    "noise": "box_muller", "_sample": "always", "_seed": 5},
    "sign-beta": {"sign_beta": 0.2, "momentum": 0.7},
    "sign-beta-separate-sampled": {"sign_beta": 0.3, "separate_momentum": True,
                                   "sigma": 0.1, "_sample": "alternate"},
    "mean": {"point_estimate": "mean", "sigma": 0.3, "separate_momentum": True,
             "_sample": "alternate"},
    "no-decay": {"weight_decay": 0.0},
    "tight-bounds": {"lr": 0.05, "weight_decay": 2.0, "m_ref": 0.5, "momentum": 0.5,
                     "_schedule": True},
    "moment-matched": {"init": "moment_matched", "init_sigma": 0.7},
    "abs-pair": {"init": "abs_pair", "weight_decay": 0.0, "_sample": "always"},
    "abs-pair-decay": {"init": "abs_pair", "separate_momentum": True},
    "adamw-never": {"adamw": "never", "separate_momentum": True, "_sample": "alternate"},
    "adamw-always": {"adamw": "always", "adamw_betas": (0.8, 0.99), "eps": 1e-6},
    "schedule": {"adamw_lr_ratio": 0.5, "momentum": 0.8, "_schedule": True, "_groups": 2},
}
"""Every option of LMD; ``_sample`` ("always" / "alternate": training samples at even
steps, a predictive draw at odd ones), ``_schedule`` (lr and weight_decay change mid-run; the
larger weight_decay narrows the bounds, so "tight-bounds" needs the clamp: the decay alone
never leaves them while lr * weight_decay <= 1), ``_groups`` (the second matrix and the 1-D
tensor in a second group) drive the run; ``_seed`` replaces a seed whose run came within
SIGN_MARGIN of a zero momentum."""


def twin_initial(params, groups_of, kwargs, seed):
    """The initial log-medians a twin optimizer (same seed and weights) draws, checked
    against their documented form."""
    twins = [torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
             for p in params]
    twin = LMD(groups_of(twins), seed=seed, **kwargs)
    twin.sample_()
    twin.restore_()
    out = {}
    index = {p: i for i, p in enumerate(q for g in twin.param_groups for q in g["params"])}
    init_sigma = kwargs.get("init_sigma", DEFAULTS["init_sigma"])
    for p, lm in twin.log_medians():
        lp, ln = lm.pos.double(), lm.neg.double()
        s = math.sqrt(params[index[p]].detach().double().square().mean().item())
        if kwargs["init"] == "moment_matched":  # log m0 + s0 zeta: zeta is N(0, 1)-like
            e = math.exp(init_sigma**2)
            log_m0 = math.log(s / math.sqrt(2 * e * (e - 1)))
            zeta = torch.cat([lp.flatten(), ln.flatten()]).sub(log_m0).div(init_sigma)
        else:  # |w+-| + 1e-5 with w+- ~ N(0, s^2)
            zeta = torch.cat([lp.flatten(), ln.flatten()]).exp().sub(ABS_PAIR_FLOOR).div(s)
            assert zeta.min() >= -1e-6
        assert abs(zeta.square().mean().item() - 1.0) < 0.35, "init draws not of unit scale"
        out[index[p]] = (lm.pos.clone(), lm.neg.clone())
    return out


def run_case(name, foreach, compiled=False, steps=25):
    options = dict(CASES[name])
    seed = options.pop("_seed", 11)
    sample_mode = options.pop("_sample", None)
    schedule = options.pop("_schedule", False)
    two_groups = options.pop("_groups", 1) == 2
    params = make_params()

    def groups_of(ps):
        if not two_groups:
            return [{"params": ps}]
        return [{"params": [ps[0], ps[3], ps[4]]},
                {"params": [ps[1], ps[2]], "lr": 0.02, "momentum": 0.6}]

    ordered = [p for g in groups_of(params) for p in g["params"]]
    kwargs = {**options, "foreach": foreach, "compiled": compiled}
    initial = (twin_initial(params, groups_of, options, seed)
               if options.get("init", "from_weights") != "from_weights" else None)
    opt = LMD(groups_of(params), seed=seed, **kwargs)
    ref = ReferenceLMD([(g["params"], {**options, **{k: v for k, v in g.items() if k != "params"}})
                        for g in groups_of(params)], seed, initial)
    g = torch.Generator().manual_seed(seed + 1)
    for t in range(steps):
        if schedule and t in (8, 16):
            for group, rgroup in zip(opt.param_groups, ref.groups, strict=True):
                for key, factor in (("lr", 0.5 if t == 8 else 3.0), ("weight_decay", 2.0)):
                    group[key] = rgroup[key] = group[key] * factor
        sampled = sample_mode == "always" or (sample_mode == "alternate" and t % 2 == 0)
        if sampled:
            opt.sample_()
            ref.sample()
            assert opt.holds_sample
            assert_weights([p for p in ordered], ref, "sample")
        elif sample_mode == "alternate":  # a predictive draw must leave the step noise-free
            opt.sample_(draw=t)
            opt.restore_()
        grads = [gradient(p, t, g) if p.requires_grad else None for p in ordered]
        if t == 11:
            grads[0].view(-1)[7] = float("nan")  # skipped: weights and step count unchanged
        for p, grad in zip(ordered, grads, strict=True):
            p.grad = grad
        opt.step()
        ref.step(grads, sampled)
        assert not opt.holds_sample  # the parameters hold the point estimate again
        assert_weights(ordered, ref, f"step {t}")
        assert_log_medians(opt, ref)
    assert opt.skipped_steps == (1 if steps > 11 else 0)
    assert ref.sign_margin > SIGN_MARGIN, f"ill-conditioned run: margin {ref.sign_margin:.3g}"
    return opt, ref


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("name", list(CASES))
def test_lmd_matches_the_float64_reference(name, foreach):
    _, ref = run_case(name, foreach)
    if name == "tight-bounds":  # the clamp took part after the bounds narrowed
        assert ref.clamped > 0


def test_reference_runs_exercise_every_rule():
    """The runs above are not vacuous: the AdamW routing, the clamp, zero momenta and the
    point estimate all take part where their case says."""
    _, ref = run_case("defaults", foreach=False)
    assert [t["adamw"] for t in ref.tensors] == [False, False, True, True, False]
    assert ref.tensors[4]["frozen"]
    _, ref = run_case("adamw-never", foreach=False, steps=3)
    assert not any(t["adamw"] for t in ref.tensors)
    zero = ref.tensors[3]
    assert zero["s"] == pytest.approx(1 / math.sqrt(10))  # the all-zero tensor's s
    assert not torch.equal(zero["w"], torch.zeros_like(zero["w"]))  # and it moved


@pytest.mark.slow
@pytest.mark.parametrize("name", ["defaults", "separate-sampled", "tight-bounds"])
def test_compiled_lmd_matches_the_float64_reference(name):
    run_case(name, foreach=False, compiled=True)


@settings(max_examples=12, deadline=None)
@given(
    lr=st.floats(1e-3, 0.1), momentum=st.floats(0.0, 0.99), sigma=st.floats(0.0, 0.5),
    weight_decay=st.sampled_from([0.0, 0.05, 0.5, 3.0]), m_ref=st.floats(0.3, 3.0),
    sign_beta=st.one_of(st.none(), st.floats(0.0, 0.95)), separate=st.booleans(),
    mean=st.booleans(), sample=st.booleans(), seed=st.integers(0, 2**20),
)
def test_random_hyperparameters_match_the_reference(
    lr, momentum, sigma, weight_decay, m_ref, sign_beta, separate, mean, sample, seed
):
    options = dict(lr=lr, momentum=momentum, sigma=sigma, weight_decay=weight_decay,
                   m_ref=m_ref, sign_beta=sign_beta, separate_momentum=separate,
                   point_estimate="mean" if mean else "median", adamw="never")
    w = torch.randn(10, 12, generator=torch.Generator().manual_seed(seed)) * 0.2
    p = torch.nn.Parameter(w.clone())
    opt = LMD([p], seed=seed, compiled=False, **options)
    ref = ReferenceLMD([([p], options)], seed)
    g = torch.Generator().manual_seed(seed + 1)
    worst = 0.0
    for _ in range(12):
        if sample:
            opt.sample_()
            ref.sample()
        grad = torch.randn(p.shape, generator=g)
        p.grad = grad
        opt.step()
        ref.step([grad], sample)
        t = ref.tensors[0]
        size = t["lp"].exp() + t["ln"].exp()
        err = ((p.detach().double() - t["w"]).abs() / (size * ReferenceLMD._scale(t["group"])))
        worst = max(worst, err.max().item())
    assume(ref.sign_margin > SIGN_MARGIN)  # fp32 rounding may flip a sign of a near-zero u
    assert worst <= LOG_TOL + EXP_REL
