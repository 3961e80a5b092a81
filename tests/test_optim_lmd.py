"""LMD: initialisation, bounds, sign flips, zero tensors, the posterior protocol, noise, memory."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_lowprec import LMD
from lightning_lowprec.optim import counter_rng
from lightning_lowprec.posterior import PosteriorOptimizer, is_posterior, sampled_params


def log_medians(opt, p):
    return opt.state[p]["log_median_pos"], opt.state[p]["log_median_neg"]


def point_estimate(opt, p):
    lp, ln = log_medians(opt, p)
    return lp.exp() - ln.exp()


def m0_over_s(init_sigma):
    e = math.exp(init_sigma**2)
    return 1.0 / math.sqrt(2 * e * (e - 1))


# -- initialisation ------------------------------------------------------------------------


def test_from_weights_init_keeps_the_weights_and_median_scale():
    w = torch.randn(64, 32) * 0.02
    w[0, :4] = torch.tensor([0.0, 1.0, -1.0, 1e-8])  # zeros and far-out values too
    p = torch.nn.Parameter(w.clone())
    opt = LMD([p], seed=0)
    opt.sample_()
    opt.restore_()
    s = w.square().mean().sqrt().item()
    m0 = m0_over_s(0.5) * s
    # exp(log m) round trips cost ~1e-7 of the larger median
    torch.testing.assert_close(point_estimate(opt, p), w, rtol=1e-5, atol=1e-6 * m0)
    torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-6 * m0)
    lp, ln = log_medians(opt, p)
    torch.testing.assert_close(lp + ln, torch.full_like(lp, 2 * math.log(m0)))  # m+ m- = m0^2
    assert opt.state[p]["log_m_ref"] == pytest.approx(math.log(m0))


def test_documented_median_scales():
    # The rule lr * m0 / s ~ 0.01 rests on m0 = 1.17 s at init_sigma 0.5; with init_sigma =
    # sigma = 0.05, m0 = 14 s (the measured failure).
    assert m0_over_s(0.5) == pytest.approx(1.17, abs=0.005)
    assert m0_over_s(0.05) == pytest.approx(14.1, abs=0.05)


def test_moment_matched_init_matches_the_weights_rms():
    w = torch.randn(256, 256) * 0.05
    p = torch.nn.Parameter(w.clone())
    opt = LMD([p], init="moment_matched", seed=0)
    opt.restore_()
    opt.sample_()
    opt.restore_()
    theta = point_estimate(opt, p)
    assert theta.std().item() == pytest.approx(0.05, rel=0.03)
    assert not torch.allclose(theta, w)  # a fresh draw, not the weights
    lp, _ = log_medians(opt, p)
    assert lp.std().item() == pytest.approx(0.5, rel=0.03)
    assert lp.mean().item() == pytest.approx(math.log(m0_over_s(0.5) * 0.05), abs=0.01)
    torch.testing.assert_close(p.detach(), theta)


def test_abs_pair_init():
    p = torch.nn.Parameter(torch.randn(64, 64) * 0.02)
    opt = LMD([p], init="abs_pair", weight_decay=0.0, seed=0)
    opt.sample_()
    lp, ln = log_medians(opt, p)
    assert lp.exp().min() >= 1e-5 and ln.exp().min() >= 1e-5
    assert (lp.exp() - 1e-5).mean().item() == pytest.approx(0.02 * math.sqrt(2 / math.pi),
                                                            rel=0.05)


def test_init_is_reproducible_from_the_seed():
    a = torch.nn.Parameter(torch.randn(8, 8))
    b = torch.nn.Parameter(a.detach().clone())
    oa, ob = LMD([a], init="moment_matched", seed=5), LMD([b], init="moment_matched", seed=5)
    oa.sample_()
    ob.sample_()
    assert torch.equal(a, b)


# -- dynamics: bounds, sign flips, zero tensors ---------------------------------------------


@settings(max_examples=3, deadline=None)
@given(
    lr=st.floats(0.01, 0.3),
    decay=st.floats(0.2, 3.0),
    m_ref=st.floats(0.1, 10.0),
    init=st.sampled_from(["from_weights", "moment_matched", "abs_pair"]),
    separate=st.booleans(),
    sign_beta=st.sampled_from([None, 0.5]),
    seed=st.integers(0, 2**31),
)
def test_medians_stay_inside_the_decay_bounds_under_adversarial_gradients(
    lr, decay, m_ref, init, separate, sign_beta, seed
):
    decay = min(decay, 1.0 / lr)
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(32, 8, generator=g) * 0.1)
    opt = LMD([p], lr=lr, weight_decay=decay, m_ref=m_ref, init=init,
              separate_momentum=separate, sign_beta=sign_beta, sigma=0.2, seed=seed)
    # Each row is one adversary: a constant push either way, alternating or random signs,
    # with magnitudes from 1e-30 to 1e30.
    steps, rows = 2000, torch.arange(32)
    magnitude = torch.tensor([1e-30, 1.0, 1e30, 1e-3])[rows % 4].view(1, 32, 1)
    kind = (rows // 4 % 4).view(1, 32, 1)
    alternating = ((-1.0) ** torch.arange(steps)).view(steps, 1, 1)
    random = torch.randn(steps, 32, 1, generator=g).sign()
    sign = torch.where(kind == 0, 1.0, torch.where(kind == 1, -1.0, alternating))
    grads = (torch.where(kind == 3, random, sign) * magnitude).expand(steps, 32, 8).contiguous()
    for t in range(steps):
        if t % 10 == 0:
            opt.sample_()
        p.grad = grads[t]
        opt.step()
        if t % 50 == 49 or t < 5:
            state = opt.state[p]
            lmr, half = state["log_m_ref"], 1.0 / decay
            low, high = math.exp(lmr - half), math.exp(lmr + half)
            # the clamp holds exactly at the fp32-rounded bounds
            log_low, log_high = torch.tensor([lmr - half, lmr + half]).tolist()
            for log_m in log_medians(opt, p):
                assert log_m.min().item() >= log_low and log_m.max().item() <= log_high
                m = log_m.exp()
                assert m.min().item() >= low * (1 - 1e-6) and m.max().item() <= high * (1 + 1e-6)
    assert torch.isfinite(p).all()


@settings(max_examples=10, deadline=None)
@given(w0=st.floats(0.001, 0.05), lr=st.floats(0.005, 0.05), sigma=st.floats(0.0, 0.3))
def test_the_sign_of_a_weight_can_flip(w0, lr, sigma):
    p = torch.nn.Parameter(torch.full((4, 4), w0))
    opt = LMD([p], lr=lr, sigma=sigma, seed=0)
    for _ in range(2000):
        opt.sample_()
        p.grad = torch.ones(4, 4)  # always push down
        opt.step()
        if (p < 0).all():
            break
    assert (p < 0).all()
    lp, ln = log_medians(opt, p)
    assert (ln > lp).all()


@pytest.mark.parametrize("adamw", ["auto", "never"])
def test_zero_initialised_tensors_move(adamw):
    p = torch.nn.Parameter(torch.zeros(8, 16))
    opt = LMD([p], adamw=adamw, seed=0)
    target = torch.randn(8, 16) * 0.1
    for _ in range(100):
        with opt.sampled_params():
            loss = (p - target).square().sum()
            loss.backward()
        opt.step()
        opt.zero_grad()
    assert opt.state[p]["adamw"] == (adamw == "auto")
    assert (p - target).square().sum() < 0.5 * target.square().sum()


def test_without_sampling_the_gradient_is_taken_at_the_point_estimate():
    p = torch.nn.Parameter(torch.randn(8, 8) * 0.1)
    opt = LMD([p], seed=0, sigma=0.3)
    for _ in range(3):
        p.grad = torch.randn(8, 8)
        opt.step()
        assert not opt.holds_sample
        torch.testing.assert_close(p.detach(), point_estimate(opt, p), rtol=0, atol=0)


def test_point_estimate_mean_option():
    w = torch.randn(8, 8) * 0.1
    p = torch.nn.Parameter(w.clone())
    opt = LMD([p], point_estimate="mean", sigma=0.3, weight_decay=0.0, seed=0)
    p.grad = torch.zeros(8, 8)
    opt.step()  # no gradient, no decay: the medians stay where from_weights put them
    torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(p.detach(), math.exp(0.3**2 / 2) * point_estimate(opt, p))


# -- the posterior protocol -------------------------------------------------------------------


def test_protocol_membership():
    p = torch.nn.Parameter(torch.randn(4, 4))
    opt = LMD([p])
    assert isinstance(opt, PosteriorOptimizer) and is_posterior(opt)
    assert not is_posterior(torch.optim.AdamW([p]))

    class Wrapper:  # Lightning's LightningOptimizer / Fabric's _FabricOptimizer hold .optimizer
        optimizer = opt

    assert is_posterior(Wrapper())


def test_sample_restore_and_idempotence():
    p = torch.nn.Parameter(torch.randn(16, 16) * 0.1)
    q = torch.nn.Parameter(torch.randn(16))  # AdamW rule: never sampled
    opt = LMD([p, q], sigma=0.2, seed=1)
    rest_q = q.detach().clone()
    opt.sample_()
    assert opt.holds_sample
    first = p.detach().clone()
    assert not torch.allclose(first, point_estimate(opt, p))
    opt.sample_()
    assert torch.equal(p, first)
    opt.restore_()
    assert not opt.holds_sample
    assert torch.equal(p.detach(), point_estimate(opt, p))
    opt.sample_()  # the next micro-batch of the same step: the same sample
    assert torch.equal(p, first) and torch.equal(q, rest_q)
    p.grad, q.grad = torch.zeros(16, 16), torch.zeros(16)
    opt.step()
    opt.sample_()
    assert not torch.equal(p, first)  # a new step, a new sample


def test_sampled_params_restores_on_error():
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = LMD([p], seed=0)
    with pytest.raises(RuntimeError, match="boom"), sampled_params(opt):
        assert opt.holds_sample
        raise RuntimeError("boom")
    assert not opt.holds_sample
    torch.testing.assert_close(p.detach(), point_estimate(opt, p))


def test_closure_runs_at_the_sample_and_step_leaves_the_point_estimate():
    p = torch.nn.Parameter(torch.randn(8, 8) * 0.1)
    opt = LMD([p], sigma=0.2, seed=0)
    opt.sample_()
    sample = p.detach().clone()
    opt.restore_()
    seen = []

    def closure():
        seen.append(p.detach().clone())
        opt.zero_grad()
        loss = p.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.equal(seen[0], sample)
    assert not opt.holds_sample and torch.equal(p.detach(), point_estimate(opt, p))


def test_sigma_zero_samples_the_point_estimate():
    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = LMD([p], sigma=0.0, seed=0)
    opt.sample_()
    torch.testing.assert_close(p.detach(), point_estimate(opt, p), rtol=0, atol=0)


def test_sampling_is_reproducible_from_state_dict_and_across_ranks():
    torch.manual_seed(0)
    w = torch.randn(16, 16) * 0.1
    a, b = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    oa, ob = LMD([a], sigma=0.2, seed=9), LMD([b], sigma=0.2, seed=9)  # two "ranks"
    for _ in range(3):
        for opt, p in ((oa, a), (ob, b)):
            opt.sample_()
            p.grad = torch.ones(16, 16) * (p.detach().mean() > 0)
        assert torch.equal(a, b)  # same sample on every rank
        oa.step()
        ob.step()
    assert torch.equal(oa.state[a]["log_median_pos"], ob.state[b]["log_median_pos"])
    saved = copy.deepcopy(oa.state_dict())
    oa.sample_()
    expected = a.detach().clone()
    oa.restore_()
    c = torch.nn.Parameter(a.detach().clone())
    oc = LMD([c], sigma=0.2)  # another seed, restored from the state_dict
    oc.load_state_dict(saved)
    oc.sample_()
    assert torch.equal(c, expected)


def test_samples_follow_the_log_normal_posterior():
    # Identical medians everywhere: the elements are i.i.d. draws of m+ e+ - m- e-.
    sigma = 0.1
    p = torch.nn.Parameter(torch.full((512, 512), 1.0))
    opt = LMD([p], sigma=sigma, seed=3)
    opt.sample_()
    m_pos, m_neg = (m.exp()[0, 0].item() for m in log_medians(opt, p))
    e = math.exp(sigma**2)
    mean = math.sqrt(e) * (m_pos - m_neg)
    var = e * (e - 1) * (m_pos**2 + m_neg**2)
    theta = p.detach().double()
    assert abs(theta.mean().item() - mean) < 5 * math.sqrt(var / theta.numel())
    assert theta.var().item() == pytest.approx(var, rel=0.02)


# -- memory ---------------------------------------------------------------------------------


def state_bytes(opt):
    return sum(v.nbytes for s in opt.state.values() for v in s.values() if torch.is_tensor(v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_is_adamw_plus_one_tensor(dtype):
    p = torch.nn.Parameter(torch.randn(64, 64).to(dtype))
    opt = LMD([p], seed=0)
    p.grad = torch.randn(64, 64).to(dtype)
    opt.step()
    assert state_bytes(opt) == 3 * 4 * p.numel()  # l+, l-, u in fp32 (AdamW fp32: 2)
    assert all(v.dtype == torch.float32 for v in opt.state[p].values() if torch.is_tensor(v))
    sep = LMD([p], separate_momentum=True, seed=0)
    sep.step()
    assert state_bytes(sep) == 4 * 4 * p.numel()


# -- the counter-based noise ------------------------------------------------------------------


def irwin_hall_tail(x):
    """Exact P(|xi| > x) for the standardised sum of four uniform bytes."""
    pmf = torch.ones(256, dtype=torch.float64)
    total = pmf
    for _ in range(3):
        total = torch.nn.functional.conv1d(
            total.view(1, 1, -1), pmf.flip(0).view(1, 1, -1), padding=255
        ).view(-1)
    total = total / total.sum()
    values = (torch.arange(total.numel(), dtype=torch.float64) - 510) / math.sqrt(21845)
    return total[values.abs() > x].sum().item()


N = 1 << 20


def draws(kind, *words):
    keys = torch.tensor(counter_rng.derive_keys(*words), dtype=torch.int32)
    return counter_rng.normal_pair(N, keys, kind)


def corr(a, b):
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return ((a * b).mean() / (a.square().mean() * b.square().mean()).sqrt()).item()


@pytest.mark.parametrize("kind", ["irwin_hall", "box_muller"])
def test_noise_statistics(kind):
    xp, xn = draws(kind, 1, 0, 0, 1)
    bound = 5 / math.sqrt(N)
    for x in (xp, xn):
        assert abs(x.double().mean().item()) < bound
        assert abs(x.double().std().item() - 1) < 2 * bound
    x = torch.cat([xp, xn]).double()
    for threshold in (1.0, 2.0, 3.0):
        expected = (irwin_hall_tail(threshold) if kind == "irwin_hall"
                    else math.erfc(threshold / math.sqrt(2)))
        observed = (x.abs() > threshold).double().mean().item()
        assert abs(observed - expected) < 5 * math.sqrt(expected / x.numel()) + 1e-6
    if kind == "irwin_hall":
        assert x.abs().max().item() <= 510 / math.sqrt(21845) + 1e-6
        kurtosis = (x.pow(4).mean() / x.square().mean().square()).item()
        assert kurtosis == pytest.approx(2.7, abs=0.02)


@pytest.mark.parametrize("kind", ["irwin_hall", "box_muller"])
def test_noise_independence(kind):
    bound = 5 / math.sqrt(N)
    xp, xn = draws(kind, 1, 0, 0, 1)
    next_step, _ = draws(kind, 1, 0, 1, 1)  # the same tensor one step later
    other_tensor, _ = draws(kind, 1, 1, 0, 1)
    other_seed, _ = draws(kind, 2, 0, 0, 1)
    for a, b in ((xp, xn), (xp, next_step), (xn, next_step), (xp, other_tensor),
                 (xp, other_seed), (xp[1:], xp[:-1])):
        assert abs(corr(a, b)) < bound
        assert abs(corr(a.square(), b.square())) < 2 * bound
    assert not torch.equal(xp, next_step)


def test_random_words_are_balanced_and_size_independent():
    keys = torch.tensor(counter_rng.derive_keys(4, 2), dtype=torch.int32)
    (words,) = counter_rng.random_words(N, keys)
    bits = torch.stack([(words >> b) & 1 for b in range(32)]).double().mean(1)
    assert (bits - 0.5).abs().max().item() < 5 * 0.5 / math.sqrt(N)
    assert torch.equal(counter_rng.random_words(100, keys)[0], words[:100])


def test_hash_matches_its_scalar_twin():
    x = torch.tensor([0, 1, 2, 2**31 - 1, -(2**31), -1, 123456789], dtype=torch.int32)
    expected = [counter_rng._signed32(counter_rng._mix32(v)) for v in x.tolist()]
    assert counter_rng.hash32(x).tolist() == expected


@pytest.mark.parametrize("offset", [0, 12345, 2**30 + 17, 3 * 2**30 - 600, 2**40 + 5])
def test_folded_high_index_gives_the_words_of_the_int64_index(offset):
    """The compiled sample's int32 index with the high part folded into the key (issue 15)
    draws the words the int64 index path draws, also past 2**30 and for large shards."""
    words = counter_rng.derive_keys(5, 1, 2)
    ref = counter_rng.random_words(
        500, torch.tensor(words, dtype=torch.int32), 2, torch.tensor(offset))
    folded, low = counter_rng.fold_high(words, offset, 500)
    got = counter_rng.random_words(500, torch.tensor(folded, dtype=torch.int32), 2,
                                   torch.tensor(low, dtype=torch.int32))
    assert all(torch.equal(a, b) for a, b in zip(ref, got, strict=True))
    assert counter_rng.fold_high(words, 2**30 - 10, 20) is None  # crosses 2**30: int64 path


@pytest.mark.slow
@pytest.mark.parametrize("weight_decay", [0.1, 0.0])  # inline exp / torch.exp (unbounded)
def test_compiled_noise_and_step_match_eager(weight_decay):
    keys = torch.tensor(counter_rng.derive_keys(0, 1, 2, 3), dtype=torch.int32)
    fn = torch.compile(counter_rng.normal_pair, dynamic=True, fullgraph=True)
    for eager, comp in zip(counter_rng.normal_pair(4099, keys), fn(4099, keys), strict=True):
        assert torch.equal(eager, comp)  # bit-exact: integer hash, exact byte sum

    shapes = [(24, 40), (40,), (7, 9, 3)]
    results = []
    for mode in ({"foreach": False}, {"compiled": True}):
        torch.manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s) * 0.1) for s in shapes]
        opt = LMD(params, seed=2, sigma=0.2, adamw="never", weight_decay=weight_decay, **mode)
        g = torch.Generator().manual_seed(0)
        samples = []
        for _ in range(4):
            opt.sample_()
            samples.append([p.detach().clone() for p in params])
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        results.append((samples, [p.detach().clone() for p in params]))
    (s_eager, p_eager), (s_comp, p_comp) = results
    for a, b in zip(s_eager + [p_eager], s_comp + [p_comp], strict=True):
        for x, y in zip(a, b, strict=True):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0, 12345, 2**30 - 5000, 2**31 + 7])  # a shard's start
@pytest.mark.parametrize("noise", ["irwin_hall", "box_muller"])
def test_eager_sample_in_chunks_equals_the_whole_tensor_bitwise(noise, offset, dtype):
    from lightning_lowprec.optim import lmd

    n = 3 * lmd._EAGER_CHUNK + 1234
    g = torch.Generator().manual_seed(0)
    lp, ln = torch.randn(n, generator=g) - 3, torch.randn(n, generator=g) - 3
    words = counter_rng.derive_keys(0, 1, 2, 3)
    keys = torch.tensor(words, dtype=torch.int32)
    whole, chunked = torch.empty(n, dtype=dtype), torch.empty(n, dtype=dtype)
    lmd._sample_tensor(whole, lp, ln, keys, 0.05, noise, torch.tensor(offset))
    lmd._sample_chunked(chunked, lp, ln, keys, 0.05, noise, offset)
    assert torch.equal(whole, chunked)


@pytest.mark.parametrize("offset", [0, 7, 2**30 - 4099, 2**30, 2**31 + 7, 2**40 + 5])
def test_irwin_hall_pair_into_buffers_equals_normal_pair_bitwise(offset):
    """The eager sample's in-place noise (issue 15) draws ``normal_pair``'s values, also past
    ``2**30`` (index high part folded into the key) and into reused, dirty buffers."""
    keys = torch.tensor(counter_rng.derive_keys(3, 1, 4), dtype=torch.int32)
    out = torch.full((2, 4099), float("nan"))
    work = torch.full((2, 4099), -1, dtype=torch.int32)
    for n in (4099, 100):
        expected = torch.stack(counter_rng.normal_pair(n, keys, "irwin_hall", offset))
        got = counter_rng.irwin_hall_pair_(out[:, :n], keys, offset, work[:, :n])
        assert torch.equal(got, expected)
    with pytest.raises(ValueError, match="cross a multiple of 2\\*\\*30"):
        counter_rng.irwin_hall_pair_(out, keys, 2**30 - 10, work)


def test_irwin_hall_sum_of_bytes_matches_a_direct_count():
    """``_irwin_hall``'s lane arithmetic against the four bytes added one by one."""
    x = torch.randint(-(2**31), 2**31 - 1, (100_000,), dtype=torch.int32)
    x[:4] = torch.tensor([0, -1, 2**31 - 1, -(2**31)], dtype=torch.int32)
    total = sum((x.long() >> (8 * k)) & 0xFF for k in range(4))
    expected = (total.double() - 510) / math.sqrt(4 * (256**2 - 1) / 12)
    torch.testing.assert_close(counter_rng._irwin_hall(x).double(), expected, rtol=0, atol=1e-6)


# -- writes to the parameters (issue 20) ----------------------------------------------------


def _trained_layer(**kwargs):
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 16, bias=False)
    opt = LMD(layer.parameters(), seed=0, **kwargs)
    for _ in range(3):
        with opt.sampled_params():
            layer(torch.randn(4, 32)).square().sum().backward()
        opt.step()
        opt.zero_grad()
    return layer, opt


@pytest.mark.parametrize("kwargs", [{}, {"foreach": False}, {"point_estimate": "mean"},
                                    {"separate_momentum": True}])
def test_written_weights_are_kept_by_the_next_step(kwargs):
    """``load_state_dict`` of the model (or an EMA swap) writes the parameters; LMD re-derives
    its medians from them instead of writing its old point estimate back."""
    layer, opt = _trained_layer(**kwargs)
    layer.load_state_dict({"weight": torch.full((16, 32), 0.5)})
    layer.weight.grad = torch.zeros_like(layer.weight)
    opt.step()
    # a step moves a weight by about lr * (m+ + m-): ~0.006 here
    torch.testing.assert_close(layer.weight.detach(), torch.full((16, 32), 0.5), atol=0.02, rtol=0)
    lp, ln = log_medians(opt, layer.weight)
    assert (lp.exp() - ln.exp()).mean() == pytest.approx(0.5, abs=0.02)


def test_written_weights_are_kept_through_a_sample():
    """The plugin samples before the forward: the sample must be around the written weights."""
    layer, opt = _trained_layer()
    with torch.no_grad():
        layer.weight.fill_(-0.25)
    opt.sample_()
    assert layer.weight.detach().mean().item() == pytest.approx(-0.25, abs=0.02)
    opt.restore_()
    torch.testing.assert_close(layer.weight.detach(), torch.full((16, 32), -0.25), atol=1e-6,
                               rtol=1e-5)


def test_own_writes_and_resume_do_not_rederive_the_medians():
    """Sampling, restoring, stepping and resuming (model, then optimizer) leave the medians
    to LMD: the same run with and without the write check is bit-equal."""
    layer, opt = _trained_layer(separate_momentum=True)
    saved_model = copy.deepcopy(layer.state_dict())
    saved = copy.deepcopy(opt.state_dict())
    medians = [t.clone() for t in log_medians(opt, layer.weight)]
    fresh = torch.nn.Linear(32, 16, bias=False)
    fresh.load_state_dict(saved_model)
    opt2 = LMD(fresh.parameters(), seed=0, separate_momentum=True)
    opt2.load_state_dict(saved)
    for o, model in ((opt, layer), (opt2, fresh)):
        o.sample_()
        model.weight.grad = torch.ones_like(model.weight)
        o.step()
    for a, b in zip(log_medians(opt, layer.weight), log_medians(opt2, fresh.weight),
                    strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(log_medians(opt, layer.weight)[0], medians[0])
    assert torch.equal(layer.weight, fresh.weight)
    lp, ln = log_medians(opt, layer.weight)  # u+ != u-: not the from_weights pair m+ m- = m0^2
    assert (lp + ln - 2 * opt.state[layer.weight]["log_m_ref"]).abs().max() > 1e-3


def test_the_first_compiled_sample_logs_its_own_duration(caplog):
    """The log names the seconds since ``sample_`` began (it used the last tensor's element
    offset as the start time, so it logged the clock's reading instead)."""
    import logging
    import re
    import time

    p = torch.nn.Parameter(torch.randn(8, 8))
    opt = LMD([p], seed=0, compiled=True)
    began = time.perf_counter()
    with caplog.at_level(logging.INFO):
        opt.sample_()
    took = float(re.search(r"first compiled sample took ([0-9.]+) s", caplog.text).group(1))
    assert took <= time.perf_counter() - began + 0.1


@pytest.mark.parametrize("foreach", [False, True])
def test_eager_sample_and_step_ignore_a_bf16_default_dtype(foreach):
    """The plugin's ``param_dtype="bf16"`` (and litgpt's ``bf16-true``) sets the default dtype
    to bf16: the eager kernels' fp32 buffers must not follow it (the noise buffer then failed
    with an overlap error, the step's temporaries would have lost 16 bits)."""

    def run() -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float32) * 0.02)
                  for s in ((300, 70), (64,))]
        opt = LMD(params, seed=1, compiled=False, foreach=foreach)
        for _ in range(2):
            for p in params:
                p.grad = torch.randn(p.shape, generator=g, dtype=torch.float32) * 1e-3
            opt.sample_()
            opt.step()
        opt.sample_()
        return [p.detach().clone() for p in params]

    expected = run()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        got = run()
    finally:
        torch.set_default_dtype(previous)
    for a, b in zip(expected, got, strict=True):
        assert a.dtype == b.dtype == torch.float32
        assert torch.equal(a, b)
