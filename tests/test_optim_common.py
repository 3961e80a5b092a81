"""What every optimizer here promises: validation, foreach == single-tensor, state_dict
round-trips, closures, non-finite skipping, frozen / 1-D / zero tensors, bf16, LitGPT use."""

from __future__ import annotations

import copy

import pytest
import torch

from lightning_lowprec import LMD, Madam, MPlusAdam

CONFIGS = [
    pytest.param(LMD, {}, id="lmd"),
    pytest.param(LMD, {"separate_momentum": True, "sign_beta": 0.5, "point_estimate": "mean",
                       "noise": "box_muller", "adamw": "never"}, id="lmd-options"),
    pytest.param(LMD, {"init": "moment_matched"}, id="lmd-moment-matched"),
    pytest.param(LMD, {"init": "abs_pair", "weight_decay": 0.0}, id="lmd-abs-pair"),
    pytest.param(MPlusAdam, {}, id="mplus"),
    pytest.param(MPlusAdam, {"storage": "bf16", "rounding": "stochastic", "adamw": "auto",
                             "state_dtype": "bfloat16"}, id="mplus-bf16-sr"),
    pytest.param(MPlusAdam, {"storage": "fp8_e4m3"}, id="mplus-fp8"),
    pytest.param(MPlusAdam, {"storage": "fp4_e2m1"}, id="mplus-fp4"),
    pytest.param(Madam, {}, id="madam"),
    pytest.param(Madam, {"adamw": "never"}, id="madam-reference"),
]


def make_params(dtype=torch.float32, seed=0):
    """A matrix, a 1-D tensor, an all-zero matrix and a frozen matrix."""
    g = torch.Generator().manual_seed(seed)
    shapes_scales = [((8, 40), 0.1), ((40,), 1.0), ((6, 32), 0.0)]
    params = [torch.nn.Parameter((torch.randn(s, generator=g) * c).to(dtype))
              for s, c in shapes_scales]
    frozen = torch.nn.Parameter(torch.randn(4, 4, generator=g).to(dtype), requires_grad=False)
    return params + [frozen]


def build(cls, params, **kwargs):
    """The optimizer with a fixed seed."""
    return cls(params, **{"seed": 7, **kwargs})


def run(cls, kwargs, steps=4, dtype=torch.float32, params=None, opt=None, grad_seed=1):
    """``steps`` steps on random gradients (LMD draws its sample first, as the plugin does)."""
    params = params if params is not None else make_params(dtype)
    opt = opt if opt is not None else build(cls, params, **kwargs)
    g = torch.Generator().manual_seed(grad_seed)
    for _ in range(steps):
        if isinstance(opt, LMD):
            opt.sample_()
        for p in params:
            if p.requires_grad:
                p.grad = torch.randn(p.shape, generator=g).to(dtype)
        opt.step()
    return params, opt


def _fp8(kwargs):
    """Whether ``kwargs`` ask M+Adam for FP8 storage (float32 parameters only)."""
    return kwargs.get("storage") in ("fp8_e4m3", "fp8_e5m2")


def assert_same(a, b):
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x.detach(), y.detach())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("cls", "kwargs"), CONFIGS)
def test_foreach_equals_single_tensor(cls, kwargs, dtype):
    if _fp8(kwargs) and dtype == torch.bfloat16:  # refused: see test_optim_mplus_adam
        pytest.skip("FP8 storage needs float32 parameters")
    a, _ = run(cls, {**kwargs, "foreach": True}, dtype=dtype)
    b, _ = run(cls, {**kwargs, "foreach": False}, dtype=dtype)
    assert_same(a, b)
    assert all(p.dtype == dtype for p in a)


@pytest.mark.parametrize(("cls", "kwargs"), CONFIGS)
def test_state_dict_round_trip_gives_identical_next_steps(cls, kwargs):
    dtype = torch.float32 if _fp8(kwargs) else torch.bfloat16
    params, opt = run(cls, kwargs, steps=3, dtype=dtype)
    saved_params = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(opt.state_dict())
    run(cls, kwargs, steps=3, dtype=dtype, params=params, opt=opt, grad_seed=2)

    resumed = [torch.nn.Parameter(p.clone(), requires_grad=q.requires_grad)
               for p, q in zip(saved_params, params, strict=True)]
    opt2 = build(cls, resumed, **kwargs)
    opt2.param_groups[0]["seed"] = 123  # the seed must come back from the state_dict
    opt2.load_state_dict(saved_state)
    for p, q in zip(resumed, params, strict=True):  # the saved dtypes, not the parameter's
        for key, value in opt2.state[p].items():
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                assert value.dtype == opt.state[q][key].dtype, key
    for p in resumed:  # fp32 second moments beside bf16 weights are the point
        for key in ("exp_avg_sq", "exp_avg_sq_mult"):
            if key in opt2.state[p] and kwargs.get("state_dtype") is None:
                assert opt2.state[p][key].dtype == torch.float32, key
    run(cls, kwargs, steps=3, dtype=dtype, params=resumed, opt=opt2, grad_seed=2)
    assert_same(params, resumed)
    assert_same([s for p in params for s in opt.state[p].values() if torch.is_tensor(s)],
                [s for p in resumed for s in opt2.state[p].values() if torch.is_tensor(s)])


@pytest.mark.parametrize(("cls", "kwargs"), CONFIGS)
def test_non_finite_gradient_skips_only_that_parameter(cls, kwargs):
    params, opt = run(cls, kwargs, steps=2)
    before = [p.detach().clone() for p in params]
    state_before = copy.deepcopy(opt.state[params[0]])
    for p in params[:3]:
        p.grad = torch.randn(p.shape)
    params[0].grad[1, 3] = float("nan")
    params[2].grad[0, 0] = float("-inf")
    opt.step()
    assert torch.equal(params[0], before[0]) and torch.equal(params[2], before[2])
    assert opt.state[params[1]]["step"] == 3 and opt.state[params[1]]["skipped"] == 0
    state_after = opt.state[params[0]]
    assert state_after["skipped"] == state_before["skipped"] + 1
    for key, value in state_before.items():
        if torch.is_tensor(value):
            assert torch.equal(state_after[key], value), key
        elif key != "skipped":
            assert state_after[key] == value, key
    assert opt.skipped_steps == 2
    assert all(torch.isfinite(p).all() for p in params)


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize(("cls", "kwargs"), CONFIGS)
def test_large_finite_gradient_is_skipped_and_never_makes_nan(cls, kwargs, foreach):
    """|g| = 3e19 is finite but ``g**2`` overflows fp32 (issue 20): the step skips that tensor
    like a non-finite gradient, and the next normal step leaves every weight finite."""
    params, opt = run(cls, {**kwargs, "foreach": foreach}, steps=2)
    before = [p.detach().clone() for p in params]
    for p in params[:3]:
        p.grad = torch.randn(p.shape)
    params[0].grad[2, 5] = 3e19
    params[1].grad[7] = -3e19
    opt.step()
    assert torch.equal(params[0], before[0]) and torch.equal(params[1], before[1])
    assert opt.state[params[0]]["step"] == 2 and opt.skipped_steps == 2
    run(cls, {}, steps=2, params=params, opt=opt, grad_seed=3)
    assert all(torch.isfinite(p).all() for p in params)
    assert not torch.equal(params[0], before[0])  # (a 1-D tensor on the FP4 grid may not move)
    for p in params[:3]:
        for value in opt.state[p].values():
            if torch.is_tensor(value) and value.is_floating_point():
                assert torch.isfinite(value).all()


@pytest.mark.parametrize("foreach", [True, False])
def test_mplus_adam_infinite_second_moment_does_not_make_nan(foreach):
    """A second moment that is inf (however it got there) freezes its weights instead of
    turning them into NaN: ``inf + w * (x - inf)`` is the write that must not happen."""
    params, opt = run(MPlusAdam, {"foreach": foreach}, steps=1)
    for key in ("exp_avg_sq", "exp_avg_sq_mult"):
        opt.state[params[0]][key].fill_(float("inf"))
    run(MPlusAdam, {}, steps=2, params=params, opt=opt, grad_seed=3)
    assert torch.isfinite(params[0]).all()


@pytest.mark.parametrize("cls", [LMD, MPlusAdam, Madam])
def test_compiled_check_of_large_gradients_skips_non_finite_ones(cls):
    """Gradients of COMPILED_MIN_NUMEL elements and more are checked as four summed quarters:
    an inf in one quarter and a -inf at the same place in another must still be caught."""
    g = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(256, 256, generator=g) * 0.02) for _ in range(4)]
    opt = build(cls, params, compiled=True)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    quarter = params[0].numel() // 4
    params[0].grad.view(-1)[5] = float("inf")
    params[0].grad.view(-1)[5 + quarter] = float("-inf")
    params[1].grad.view(-1)[-1] = float("nan")
    params[3].grad.view(-1)[7 + 2 * quarter] = 3e19  # finite, but its square overflows
    opt.step()
    assert torch.equal(params[0], before[0]) and torch.equal(params[1], before[1])
    assert torch.equal(params[3], before[3])
    assert not torch.equal(params[2], before[2])
    assert opt.skipped_steps == 3 and opt.state[params[2]]["step"] == 1


@pytest.mark.parametrize(("cls", "kwargs"), CONFIGS)
def test_closure_frozen_one_dim_and_zero_tensors(cls, kwargs):
    params = make_params()
    opt = build(cls, params, **kwargs)
    before = [p.detach().clone() for p in params]
    x = torch.randn(40)

    def closure():
        opt.zero_grad()
        loss = (params[0] @ x).square().sum() + (params[1] - 1).square().sum()
        loss = loss + (params[2] - 0.5).square().sum()
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(5)]
    assert losses[-1] < losses[0]
    assert params[3] not in opt.state and torch.equal(params[3], before[3])
    madam_reference = cls is Madam and kwargs.get("adamw") == "never"
    assert not torch.equal(params[0], before[0])  # (a 1-D tensor on the FP4 grid may not move)
    # The zero matrix moves, except under reference Madam, which can never move a zero.
    assert torch.equal(params[2], before[2]) == madam_reference
    for p in params[:3]:
        assert p.grad is not None
    opt.zero_grad()
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("cls", [LMD, Madam, MPlusAdam])
def test_adamw_rule_selection(cls):
    params = make_params()
    opt = cls(params, adamw="auto")
    run(cls, {}, steps=1, params=params, opt=opt)
    assert [opt.state[p]["adamw"] for p in params[:3]] == [False, True, True]
    opt = cls(params, adamw="never")
    run(cls, {}, steps=1, params=params, opt=opt)
    assert [opt.state[p]["adamw"] for p in params[:3]] == [False] * 3
    opt = cls([{"params": params[:1], "adamw": "always"}, {"params": params[1:]}], adamw="never")
    run(cls, {}, steps=1, params=params, opt=opt)
    assert [opt.state[p]["adamw"] for p in params[:3]] == [True, False, False]


BAD = {
    LMD: {"lr": [-1.0, float("nan"), "x"], "momentum": [1.0, -0.1], "sigma": [-0.1, 2.0],
          "weight_decay": [-1.0, float("inf")], "m_ref": [0.0], "init": ["xavier"],
          "init_sigma": [0.0], "sign_beta": [1.0], "separate_momentum": [1],
          "point_estimate": ["mode"], "noise": ["philox"], "adamw": ["yes"],
          "adamw_lr_ratio": [-1.0], "adamw_betas": [(0.9, 1.0), (0.9,)], "eps": [-1e-8],
          "seed": [1.5, True], "foreach": ["yes"], "compiled": [None]},
    MPlusAdam: {"lr": [-1e-3], "betas": [(1.0, 0.9)], "eps": [-1.0], "weight_decay": [-0.1],
                "lr_m_ratio": [-3.0], "storage": ["fp16", "mxfp4_e2m1"],
                "rounding": ["nearest"], "state_dtype": [torch.float16, "int8"],
                "adamw": [False], "seed": ["0"], "foreach": [0.5], "compiled": [1]},
    Madam: {"lr": [-0.01], "p_scale": [0.0], "g_bound": [-1.0], "adamw": ["auto "],
            "adamw_lr_ratio": [float("nan")], "adamw_betas": [(0.9, -0.1)], "eps": [-1.0],
            "weight_decay": [-1.0], "foreach": [2], "compiled": ["no"]},
}


@pytest.mark.parametrize(
    ("cls", "name", "value"),
    [(cls, name, v) for cls, table in BAD.items() for name, vs in table.items() for v in vs],
)
def test_invalid_hyperparameters_name_argument_value_and_range(cls, name, value):
    with pytest.raises(ValueError) as info:
        cls([torch.nn.Parameter(torch.ones(2, 2))], **{name: value})
    message = str(info.value)
    assert f"Invalid {name}: {value!r}; expected" in message


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize(("cls", "kwargs"), CONFIGS)
def test_zero_lr_is_accepted_and_holds_the_weights(cls, kwargs, foreach):
    """``lr=0.0`` is valid, as in torch (schedules reach it; issue 20): nothing moves but
    Madam's clamp to ``p_scale`` times the initial RMS, which any lr applies."""
    # from the weights, and no grid to round onto: only the step could move them
    kwargs = {k: v for k, v in kwargs.items() if k not in ("init", "storage")}
    params = make_params()
    before = [p.detach().clone() for p in params]
    _, opt = run(cls, {**kwargs, "lr": 0.0, "foreach": foreach}, steps=3, params=params)
    for p, w in zip(params[:3], before[:3], strict=True):
        if cls is Madam and not opt.state[p]["adamw"]:
            bound = 3.0 * w.square().mean().sqrt()
            w = w.clamp(-bound, bound)
        torch.testing.assert_close(p.detach(), w, rtol=1e-5, atol=1e-6)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(3, 3))], "lr": 0.0})


def test_lr_times_weight_decay_is_bounded():
    with pytest.raises(ValueError, match=r"Invalid lr \* weight_decay: 2.0; expected"):
        LMD([torch.nn.Parameter(torch.ones(2, 2))], lr=1.0, weight_decay=2.0)
    with pytest.raises(ValueError, match="Invalid sigma"):
        LMD([{"params": [torch.nn.Parameter(torch.ones(2, 2))], "sigma": -1.0}])


@pytest.mark.parametrize(("cls", "kwargs"), [
    (LMD, {"lr": 1e-2}), (MPlusAdam, {"lr": 3e-3}), (Madam, {"lr": 1e-2}),
])
def test_litgpt_flat_parameters_train(cls, kwargs):
    from litgpt.model import GPT, Config

    torch.manual_seed(0)
    config = Config(block_size=16, vocab_size=64, padded_vocab_size=64, n_layer=1, n_head=2,
                    n_embd=32, bias=True)
    model = GPT(config)
    model.apply(model._init_weights)
    model.lm_head.weight.requires_grad_(False)  # a frozen parameter, as LoRA leaves them
    opt = cls(model.parameters(), **kwargs)
    assert opt.defaults["lr"] == kwargs["lr"]
    x = torch.randint(0, 64, (4, 16))
    losses = []
    for _ in range(15):
        opt.zero_grad()
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 64), x[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1
    assert model.lm_head.weight not in opt.state


@pytest.mark.parametrize("cls", [LMD, MPlusAdam, Madam])
def test_rejected_param_group_is_not_added(cls):
    """``add_param_group`` validates before appending (issue 20): a group refused with
    ``ValueError`` must not stay in ``param_groups``, where the next step would move it."""
    params, opt = run(cls, {}, steps=1)
    extra = torch.nn.Parameter(torch.randn(8, 8) * 0.1)
    before = extra.detach().clone()
    with pytest.raises(ValueError, match="Invalid lr"):
        opt.add_param_group({"params": [extra], "lr": -1.0})
    assert len(opt.param_groups) == 1
    extra.grad = torch.randn(8, 8)
    run(cls, {}, steps=1, params=params, opt=opt)
    assert torch.equal(extra, before) and extra not in opt.state
    opt.add_param_group({"params": [extra], "lr": 1e-3})
    assert len(opt.param_groups) == 2
