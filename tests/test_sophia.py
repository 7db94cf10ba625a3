"""Sophia's properties as tests (sophia.py; paper Algorithms 1-3, Sections 2.1-2.3).

The update under test, per coordinate:
    m <- beta1 m + (1 - beta1) g
    theta <- theta - lr wd theta
    theta <- theta - lr clip(m / max(rho h, eps), -1, 1)
and, every k steps, h <- beta2 h + (1 - beta2) h_hat via update_hessian(h_hat).

Most of the time goes to torch.compile of the "compiled" update: one tiny graph per
parameter shape the tests use (inductor's on-disk cache makes later runs faster).
"""

import ast
import functools
import importlib.util
import io
import math
import re
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, hessian, jacrev
from torch.nn.attention import SDPBackend, sdpa_kernel

import sophia
from model import GPT, GPTConfig
from sophia import (
    Sophia,
    SophiaG,
    SophiaH,
    gnb_hessian,
    hutchinson_hessian,
    sample_labels,
)

IMPLS = ("foreach", "compiled")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Speed only: these tensors are tiny, and on a busy 2-core machine two intra-op threads
    wait on each other (a tiny GPT's step goes from ~10 ms to ~200 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True, scope="module")
def compiled_means_compiled():
    """Every test shape is its own graph of the same functions, more than torch._dynamo's
    default recompile limit (8); past it dynamo would silently run them eagerly, i.e. test
    foreach against itself. Raise the limit, and fail rather than fall back."""
    config = torch._dynamo.config
    saved = config.recompile_limit, config.fail_on_recompile_limit_hit
    config.recompile_limit, config.fail_on_recompile_limit_hit = 256, True
    yield
    config.recompile_limit, config.fail_on_recompile_limit_hit = saved


# ----------------------------------------------------------------------------- helpers

def tiny_gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=8))


def all_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


def run_tiny_gpt(impl: str, steps: int = 7, hess_every: int = 2, maximize: bool = False, skipped=(2, 5)):
    """Train a tiny GPT for a few steps with weight decay on one group, a positive Hessian
    estimate folded in every `hess_every` steps, and the steps in `skipped` flagged by
    found_inf (with an Inf in their gradient, as an overflow leaves it). Returns the
    optimizer, the initial parameters and the record of (h_hat or None, grads, skipped)
    per step, what `algorithm_3` needs to replay the run."""
    model = tiny_gpt()
    opt = SophiaG(model.param_groups(weight_decay=0.2), lr=3e-2, betas=(0.9, 0.95), rho=0.05,
                  maximize=maximize, impl=impl, stats_every=1)
    initial = [p.detach().clone() for p in all_params(opt)]
    gen = torch.Generator().manual_seed(1)
    record = []
    for step in range(steps):
        x = torch.randint(0, 16, (2, 8), generator=gen)
        y = torch.randint(0, 16, (2, 8), generator=gen)
        h_hat = [torch.rand(p.shape, generator=gen) * 0.5 + 1e-3 for p in all_params(opt)]
        h_hat = h_hat if step % hess_every == 0 else None
        if h_hat is not None:
            opt.update_hessian(h_hat)
        _, loss = model(x, y)
        loss.backward()
        if step in skipped:
            all_params(opt)[0].grad[0, 0] = float("inf")
        opt.found_inf = torch.tensor(float(step in skipped))
        record.append((h_hat, [p.grad.clone() for p in all_params(opt)], step in skipped))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return opt, initial, record


def algorithm_3(theta: torch.Tensor, record: list, index: int, *, lr: float, beta1: float, beta2: float,
                rho: float, weight_decay: float, eps: float, maximize: bool) -> tuple[torch.Tensor, int, int]:
    """Paper Algorithm 3 for one tensor (the `index`-th of each record entry), step by step in
    float64: the readable specification the update is held to. A skipped step changes nothing.
    Returns (theta, unclipped coordinates, counted coordinates)."""
    theta = theta.double()
    m, h = torch.zeros_like(theta), torch.zeros_like(theta)
    unclipped = counted = 0
    for h_hat, grads, skipped in record:
        if h_hat is not None:
            h = beta2 * h + (1 - beta2) * h_hat[index].double()
        if skipped:
            continue
        g = -grads[index].double() if maximize else grads[index].double()
        m = beta1 * m + (1 - beta1) * g
        theta = theta - lr * weight_decay * theta
        ratio = m / torch.clamp(rho * h, min=eps)
        theta = theta - lr * ratio.clamp(-1, 1)
        unclipped += int((ratio.abs() < 1).sum())
        counted += ratio.numel()
    return theta, unclipped, counted


def one_tensor_opt(impl: str, theta, **kwargs) -> tuple[torch.nn.Parameter, Sophia]:
    p = torch.nn.Parameter(torch.tensor(theta, dtype=torch.float64))
    return p, Sophia([p], impl=impl, **{"stats_every": 1, **kwargs})


# ----------------------------------------------------------------------------- the update is Algorithm 3

@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("maximize", [False, True])
def test_update_is_algorithm_3_per_tensor_over_steps_with_refreshes_skipped_steps_and_weight_decay(impl, maximize):
    opt, initial, record = run_tiny_gpt(impl, maximize=maximize)
    unclipped = counted = 0
    index = 0
    for group in opt.param_groups:
        hyper = dict(lr=group["lr"], beta1=group["betas"][0], beta2=group["betas"][1], rho=group["rho"],
                     weight_decay=group["weight_decay"], eps=group["eps"], maximize=maximize)
        for p in group["params"]:
            expected, n_unclipped, n_counted = algorithm_3(initial[index], record, index, **hyper)
            torch.testing.assert_close(p.detach().double(), expected, rtol=1e-6, atol=1e-6)
            unclipped, counted, index = unclipped + n_unclipped, counted + n_counted, index + 1
    assert 0.0 < unclipped / counted < 1.0  # the run exercises both clipped and unclipped coordinates
    assert opt.stats()["win_rate"] == pytest.approx(unclipped / counted, abs=2.0 / counted)
    assert {group["weight_decay"] for group in opt.param_groups} == {0.0, 0.2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_compiled_equals_foreach_on_empty_single_element_and_non_contiguous_tensors(dtype):
    gen = torch.Generator().manual_seed(23)
    shapes = [(5, 4), (3,), (1,), (0,), (11, 2), (3, 6)]
    values = [[torch.randn(s, generator=gen).to(dtype) for s in shapes] for _ in range(4)]
    results = []
    for impl in IMPLS:
        params = [nn.Parameter(v.clone()) for v in values[0]]
        params[-1] = nn.Parameter(values[0][-1].clone().t().contiguous().t())  # column-major
        opt = SophiaG(params, lr=0.1, rho=0.5, weight_decay=0.1, impl=impl, stats_every=1)
        for step in range(3):
            if step != 1:
                opt.update_hessian([torch.randn(s, generator=torch.Generator().manual_seed(step)).to(dtype)
                                    for s in shapes])
            for p, g in zip(params, values[step + 1]):
                p.grad = g.clone()
            opt.step()
        results.append(([p.detach().clone() for p in params], opt.stats()["win_rate"]))
    (ref, ref_rate), (got, rate) = results
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=2 * torch.finfo(dtype).eps, atol=2 * torch.finfo(dtype).eps)
    assert rate == ref_rate and 0 < rate < 1


@pytest.mark.parametrize("found_inf", [None, torch.zeros(())])
def test_each_compiled_function_is_one_graph_without_breaks(found_inf):
    """impl="compiled" leaves out fullgraph=True (with it, torch._dynamo's recompile limit
    would be an error instead of a fallback to eager); a graph break would show here."""
    tensors = [[torch.rand(s) for s in [(3, 2), (4,)]] for _ in range(4)]
    hyper = dict(beta1=0.9, rho=0.05, weight_decay=0.1, eps=1e-12, maximize=False, clip=True, sqrt_hessian=False)
    one_graph = functools.partial(torch.compile, fullgraph=True, backend="eager", dynamic=False)
    one_graph(sophia._update)(*tensors, torch.tensor(0.1), found_inf, **hyper)
    one_graph(sophia._count_unclipped)(tensors[2], tensors[3], rho=0.05, eps=1e-12, sqrt_hessian=False)
    one_graph(sophia._fold_hessian)(tensors[3], tensors[0], torch.tensor(True), 0.01)


def test_auto_impl_is_compiled_on_a_cpu_where_torch_compile_works():
    p = torch.nn.Parameter(torch.zeros(3))
    assert Sophia([p], impl="auto")._resolve_impl(p.device) == "compiled"


def test_auto_impl_falls_back_to_foreach_with_a_warning_where_torch_compile_fails(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler")

    monkeypatch.setattr(sophia, "_compile_works", functools.cache(sophia._compile_works.__wrapped__))
    monkeypatch.setattr(torch, "compile", no_compiler)
    p = torch.nn.Parameter(torch.ones(3))
    opt = Sophia([p], lr=0.1, weight_decay=0.0, impl="auto")
    p.grad = torch.ones(3)
    with pytest.warns(RuntimeWarning, match="no C.. compiler.*foreach update"):
        opt.step()
    assert opt._resolve_impl(p.device) == "foreach"
    assert torch.equal(p.detach(), torch.full((3,), 0.9))  # h = 0: lr sign(m)


def test_sophia_imports_nothing_from_this_repository():
    """sophia.py is installed alone (pyproject.toml): every import must resolve outside the repo."""
    root = Path(sophia.__file__).resolve().parent
    tree = ast.parse(Path(sophia.__file__).read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    for name in names:
        top = name.split(".")[0]
        assert top == "torch" or top in sys.stdlib_module_names, name
        origin = importlib.util.find_spec(top).origin
        parents = () if origin in (None, "built-in", "frozen") else Path(origin).resolve().parents
        # A virtualenv inside the clone (the README's .venv) is not the repository's code.
        assert root not in parents or Path(sys.prefix).resolve() in parents, name


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("clip, sqrt_hessian", [(False, False), (True, True), (False, True)])
def test_ablation_options_are_the_formula_in_every_impl(impl, clip, sqrt_hessian):
    """clip=False: theta -= lr m / max(rho h, eps); sqrt_hessian: rho sqrt(h) in its place."""
    theta, m0, g = [1.0, -2.0, 0.5, 3.0], [0.1, -0.2, 0.0, 0.3], [0.4, -0.8, 0.2, -1.0]
    h = torch.tensor([4.0, 0.25, 0.0, 1e-4], dtype=torch.float64)
    lr, beta1, beta2, rho, wd, eps = 0.1, 0.9, 0.99, 0.5, 0.2, 1e-3
    p, opt = one_tensor_opt(impl, theta, lr=lr, betas=(beta1, beta2), rho=rho, weight_decay=wd, eps=eps,
                            clip=clip, sqrt_hessian=sqrt_hessian)
    opt.state[p].update(step=torch.zeros(()), exp_avg=torch.tensor(m0, dtype=torch.float64), hessian=h.clone())
    p.grad = torch.tensor(g, dtype=torch.float64)
    opt.step()
    m = beta1 * torch.tensor(m0, dtype=torch.float64) + (1 - beta1) * torch.tensor(g, dtype=torch.float64)
    ratio = m / torch.clamp(rho * (h.sqrt() if sqrt_hessian else h), min=eps)
    expected = torch.tensor(theta, dtype=torch.float64) * (1 - lr * wd) - lr * (ratio.clamp(-1, 1) if clip else ratio)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-12, atol=1e-12)
    assert (ratio.abs() > 1).any() and (ratio.abs() < 1).any()  # the example has both kinds
    assert opt.stats()["win_rate"] == pytest.approx((ratio.abs() < 1).double().mean().item())


# ----------------------------------------------------------------------------- the update by hand

@pytest.mark.parametrize("impl", IMPLS)
def test_hand_computed_one_parameter_example_with_clipped_and_unclipped_coordinates_and_weight_decay(impl):
    lr, beta1, beta2, rho, wd = 0.1, 0.5, 0.5, 0.5, 0.2
    p, opt = one_tensor_opt(impl, [1.0, -2.0], lr=lr, betas=(beta1, beta2), rho=rho, weight_decay=wd)
    # step 1: h = 0.5*0 + 0.5*[4, 0.5] = [2, 0.25]; m = 0.5*[0.4, 3] = [0.2, 1.5]
    #   decay: [1, -2] * (1 - 0.1*0.2) = [0.98, -1.96]
    #   ratio = m / (0.5 h) = [0.2 / 1, 1.5 / 0.125] = [0.2, 12] -> clip -> [0.2, 1]
    #   theta = [0.98 - 0.02, -1.96 - 0.1] = [0.96, -2.06]
    opt.update_hessian([torch.tensor([4.0, 0.5], dtype=torch.float64)])
    p.grad = torch.tensor([0.4, 3.0], dtype=torch.float64)
    opt.step()
    assert p.tolist() == pytest.approx([0.96, -2.06], abs=1e-14)
    # step 2 (no refresh): m = 0.5*[0.2, 1.5] + 0.5*[-0.2, 1] = [0, 1.25]
    #   decay: [0.96, -2.06] * 0.98 = [0.9408, -2.0188]
    #   ratio = [0 / 1, 1.25 / 0.125] = [0, 10] -> [0, 1];  theta = [0.9408, -2.1188]
    p.grad = torch.tensor([-0.2, 1.0], dtype=torch.float64)
    opt.step()
    assert p.tolist() == pytest.approx([0.9408, -2.1188], abs=1e-14)
    # step 3: h = 0.5*[2, 0.25] + 0.5*[2, 6] = [2, 3.125]; m = 0.5*[0, 1.25] + 0.5*[1.2, -0.5] = [0.6, 0.375]
    #   decay: [0.9408, -2.1188] * 0.98 = [0.921984, -2.076424]
    #   ratio = [0.6 / 1, 0.375 / 1.5625] = [0.6, 0.24] (both unclipped)
    #   theta = [0.921984 - 0.06, -2.076424 - 0.024] = [0.861984, -2.100424]
    opt.update_hessian([torch.tensor([2.0, 6.0], dtype=torch.float64)])
    p.grad = torch.tensor([1.2, -0.5], dtype=torch.float64)
    opt.step()
    assert p.tolist() == pytest.approx([0.861984, -2.100424], abs=1e-14)
    state = opt.state[p]
    assert state["exp_avg"].tolist() == pytest.approx([0.6, 0.375], abs=1e-15)
    assert state["hessian"].tolist() == pytest.approx([2.0, 3.125], abs=1e-15)
    assert state["step"].item() == 3
    # unclipped coordinates: step 1: 1 of 2, step 2: 1 of 2 (ratio 0), step 3: 2 of 2
    assert opt.stats()["win_rate"] == pytest.approx(4 / 6)


# ----------------------------------------------------------------------------- negative curvature

@pytest.mark.parametrize("impl", IMPLS)
def test_negative_or_zero_h_gives_exactly_lr_sign_m_never_a_step_along_plus_m(impl):
    gen = torch.Generator().manual_seed(3)
    theta = torch.randn(64, generator=gen)
    grad = torch.randn(64, generator=gen)
    grad[::9] = 0.0  # m = 0: no step at all
    h = -torch.rand(64, generator=gen) * 10.0
    h[::4] = 0.0
    h[1::4] = -1e-30  # tiny negative curvature: still below eps, still sign(m)
    p = torch.nn.Parameter(theta.clone())
    opt = SophiaG([p], lr=0.05, betas=(0.5, 0.0), rho=0.05, weight_decay=0.0, impl=impl, stats_every=1)
    opt.update_hessian([h])  # beta2 = 0: h is exactly the estimate
    assert torch.equal(opt.state[p]["hessian"], h)
    p.grad = grad.clone()
    opt.step()
    m = 0.5 * grad
    assert torch.equal(p.detach(), theta - 0.05 * torch.sign(m))
    assert ((p.detach() - theta) * m <= 0).all()  # downhill along m, never uphill
    assert opt.stats()["win_rate"] == pytest.approx(grad.eq(0).float().mean().item())


@pytest.mark.parametrize("impl", IMPLS)
def test_mixed_sign_h_with_large_m_never_steps_along_plus_m(impl):
    gen = torch.Generator().manual_seed(4)
    theta = torch.randn(1000, generator=gen)
    p = torch.nn.Parameter(theta.clone())
    opt = SophiaH([p], lr=0.1, betas=(0.0, 0.0), rho=0.01, weight_decay=0.0, impl=impl, stats_every=1)
    opt.update_hessian([torch.randn(1000, generator=gen) * 100])
    p.grad = torch.randn(1000, generator=gen) * 100
    opt.step()
    assert ((p.detach() - theta) * p.grad <= 0).all()
    assert ((p.detach() - theta).abs() <= 0.1 + 1e-7).all()


# ----------------------------------------------------------------------------- maximize

@pytest.mark.parametrize("impl", IMPLS)
def test_maximize_flips_the_direction(impl):
    gen = torch.Generator().manual_seed(5)
    theta, grad, h = (f(50, generator=gen, dtype=torch.float64) for f in (torch.randn, torch.randn, torch.rand))
    moves = []
    for maximize in (False, True):
        p = torch.nn.Parameter(theta.clone())
        opt = SophiaG([p], lr=0.1, betas=(0.0, 0.0), rho=1.0, weight_decay=0.0, maximize=maximize, impl=impl)
        opt.update_hessian([h])
        p.grad = grad.clone()
        opt.step()
        moves.append(p.detach() - theta)
    torch.testing.assert_close(moves[1], -moves[0], rtol=0.0, atol=1e-15)  # theta +- step round differently
    assert (moves[1] * grad > 0).all()  # uphill along the gradient
    assert 0 < (moves[1].abs() < 0.1 - 1e-6).sum() < 50  # some coordinates clipped, some not


@pytest.mark.parametrize("impl", IMPLS)
def test_maximize_ascends_a_concave_function(impl):
    p = torch.nn.Parameter(torch.tensor([3.0, -2.0]))
    opt = SophiaG([p], lr=0.5, betas=(0.0, 0.0), rho=1.0, weight_decay=0.0, maximize=True, impl=impl)
    for _ in range(20):
        f = -(p ** 2).sum()  # maximum at 0, Hessian diagonal -2: take h = 2 (its curvature)
        p.grad, = torch.autograd.grad(f, p)
        opt.update_hessian([torch.full((2,), 2.0)])
        opt.step()
    assert p.detach().abs().max() < 1e-3


# ----------------------------------------------------------------------------- hyperparameters

@pytest.mark.parametrize("kwargs, shown", [
    ({"lr": -1e-3}, "lr=-0.001"),
    ({"lr": float("nan")}, "lr=nan"),
    ({"rho": -0.05}, "rho=-0.05"),
    ({"eps": -1e-12}, "eps=-1e-12"),
    ({"weight_decay": -0.1}, "weight_decay=-0.1"),
    ({"betas": (1.0, 0.99)}, "beta1=1.0"),
    ({"betas": (-0.1, 0.99)}, "beta1=-0.1"),
    ({"betas": (0.9, 1.0)}, "beta2=1.0"),
    ({"betas": (0.9, 1.5)}, "beta2=1.5"),
    ({"impl": "fused"}, "impl='fused'"),
    ({"stats_every": 0}, "stats_every=0"),
    ({"stats_every": 2.5}, "stats_every=2.5"),
])
@pytest.mark.parametrize("cls", [Sophia, SophiaG, SophiaH])
def test_invalid_hyperparameters_raise_value_error_naming_the_value(cls, kwargs, shown):
    with pytest.raises(ValueError, match=re.escape(shown)):
        cls([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_zero_eps_is_rejected_because_m_zero_and_h_zero_would_give_nan():
    with pytest.raises(ValueError, match=re.escape("eps=0.0")):
        Sophia([torch.nn.Parameter(torch.zeros(2))], eps=0.0)


def test_zero_lr_rho_weight_decay_and_beta_are_valid():
    p = torch.nn.Parameter(torch.ones(2))
    opt = Sophia([p], lr=0.0, rho=0.0, weight_decay=0.0, betas=(0.0, 0.0))
    p.grad = torch.ones(2)
    opt.step()
    assert torch.equal(p.detach(), torch.ones(2))


# ----------------------------------------------------------------------------- update_hessian

def two_tensor_opt(beta2: float = 0.9, impl: str = "auto"):
    a, b = torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2, 2))
    return a, b, Sophia([{"params": [a]}, {"params": [b], "weight_decay": 0.0}], betas=(0.9, beta2), impl=impl)


# update_hessian folds eagerly, or in one compiled kernel for impl="compiled".
@pytest.mark.parametrize("impl", IMPLS)
def test_update_hessian_is_the_ema_formula(impl):
    a, b, opt = two_tensor_opt(beta2=0.9, impl=impl)
    e1 = [torch.tensor([1.0, 2.0, -3.0]), torch.tensor([[4.0, 0.0], [1e-3, 8.0]])]
    e2 = [torch.tensor([5.0, -1.0, 0.5]), torch.tensor([[0.25, 2.0], [1.0, 3.0]])]
    opt.update_hessian(e1)
    opt.update_hessian(e2)
    for p, x1, x2 in zip((a, b), e1, e2):
        expected = 0.9 * (0.9 * 0.0 + 0.1 * x1) + 0.1 * x2
        torch.testing.assert_close(opt.state[p]["hessian"], expected, rtol=1e-6, atol=0.0)
    assert opt.stats()["skipped_estimates"] == 0


@pytest.mark.parametrize("impl", IMPLS)
def test_update_hessian_uses_each_groups_beta2(impl):
    a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    opt = Sophia([{"params": [a], "betas": (0.9, 0.5)}, {"params": [b], "betas": (0.9, 0.75)}], impl=impl)
    opt.update_hessian([torch.ones(2), torch.ones(2)])
    assert opt.state[a]["hessian"].tolist() == [0.5, 0.5]
    assert opt.state[b]["hessian"].tolist() == [0.25, 0.25]


def test_update_hessian_none_entry_skips_that_parameter():
    a, b, opt = two_tensor_opt(beta2=0.5)
    opt.update_hessian([torch.ones(3), torch.ones(2, 2)])
    opt.update_hessian([None, torch.full((2, 2), 3.0)])
    assert opt.state[a]["hessian"].tolist() == [0.5, 0.5, 0.5]
    assert opt.state[b]["hessian"].tolist() == [[1.75, 1.75], [1.75, 1.75]]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_estimate_anywhere_leaves_h_unchanged_and_is_counted(bad, impl):
    a, b, opt = two_tensor_opt(beta2=0.5, impl=impl)
    opt.update_hessian([torch.ones(3), torch.ones(2, 2)])
    before = [opt.state[p]["hessian"].clone() for p in (a, b)]
    poisoned = torch.full((2, 2), 7.0)
    poisoned[1, 0] = bad  # only one coordinate of the second tensor
    opt.update_hessian([torch.full((3,), 9.0), poisoned])
    for p, h in zip((a, b), before):
        assert torch.equal(opt.state[p]["hessian"], h)  # neither tensor moved
    opt.update_hessian([torch.tensor([1.0, bad, 1.0]), None])  # in the first tensor, the second skipped
    for p, h in zip((a, b), before):
        assert torch.equal(opt.state[p]["hessian"], h)
    assert opt.stats()["skipped_estimates"] == 2
    # a finite estimate afterwards is folded in as usual, and the counter was reset
    opt.update_hessian([torch.full((3,), 3.0), torch.full((2, 2), 3.0)])
    assert opt.state[a]["hessian"].tolist() == [1.75, 1.75, 1.75]  # 0.5 * 0.5 + 0.5 * 3
    assert opt.stats()["skipped_estimates"] == 0


def test_update_hessian_wrong_length_raises():
    _, _, opt = two_tensor_opt()
    with pytest.raises(ValueError, match="fewer"):
        opt.update_hessian([torch.ones(3)])
    with pytest.raises(ValueError, match="more"):
        opt.update_hessian([torch.ones(3), torch.ones(2, 2), torch.ones(1)])


# ----------------------------------------------------------------------------- stats

@pytest.mark.parametrize("impl", IMPLS)
def test_win_rate_equals_a_hand_count_since_the_last_reset_and_hessian_norm_is_the_l2_norm_of_h(impl):
    gen = torch.Generator().manual_seed(6)
    shapes = [(5, 4), (7,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    lr, beta1, beta2, rho, eps = 0.01, 0.8, 0.9, 0.3, 1e-12
    opt = SophiaG(params, lr=lr, betas=(beta1, beta2), rho=rho, eps=eps, weight_decay=0.1, impl=impl, stats_every=1)
    m = [torch.zeros(s) for s in shapes]
    h = [torch.zeros(s) for s in shapes]
    unclipped = total = 0
    for step in range(7):
        if step == 3:
            opt.stats()  # reset: the count starts over
            unclipped = total = 0
        if step % 2 == 0:
            est = [torch.randn(s, generator=gen) for s in shapes]  # mixed signs, like Hutchinson's
            opt.update_hessian(est)
            h = [beta2 * hh + (1 - beta2) * e for hh, e in zip(h, est)]
        for p, mm, hh in zip(params, m, h):
            g = torch.randn(p.shape, generator=gen)
            p.grad = g
            mm.mul_(beta1).add_((1 - beta1) * g)
            ratio = mm / torch.clamp(rho * hh, min=eps)
            unclipped += int((ratio.abs() < 1).sum())
            total += mm.numel()
        opt.step()
    stats = opt.stats()
    assert 0 < unclipped < total
    assert stats["win_rate"] == pytest.approx(unclipped / total, abs=0.5 / total)
    norm = math.sqrt(sum(float((opt.state[p]["hessian"].double() ** 2).sum()) for p in params))
    assert stats["hessian_norm"] == pytest.approx(norm, rel=1e-6)
    assert stats["hessian_norm"] == pytest.approx(math.sqrt(sum(float((x.double() ** 2).sum()) for x in h)),
                                                  rel=1e-5)
    assert math.isnan(opt.stats()["win_rate"])  # nothing since the reset


@pytest.mark.parametrize("impl", IMPLS)
def test_stats_every_counts_only_every_nth_step_and_leaves_the_update_unchanged(impl):
    gen = torch.Generator().manual_seed(24)
    theta = torch.randn(40, generator=gen)
    grads = [torch.randn(40, generator=gen) for _ in range(7)]
    h = torch.rand(40, generator=gen)
    runs = {}
    for every in (1, 3):
        p = nn.Parameter(theta.clone())
        opt = SophiaG([p], lr=0.1, betas=(0.5, 0.0), rho=2.0, weight_decay=0.0, impl=impl, stats_every=every)
        opt.update_hessian([h])
        m, unclipped, counted = torch.zeros(40), 0, 0
        for step, g in enumerate(grads, start=1):
            p.grad = g.clone()
            opt.step()
            m = 0.5 * m + 0.5 * g
            if step % every == 0:  # steps 3 and 6 when every = 3
                unclipped += int(((m / torch.clamp(2.0 * h, min=1e-12)).abs() < 1).sum())
                counted += 40
        runs[every] = (p.detach().clone(), opt.stats()["win_rate"])
        assert runs[every][1] == pytest.approx(unclipped / counted, abs=1e-12)
    assert torch.equal(runs[1][0], runs[3][0])



# ----------------------------------------------------------------------------- no host sync; skipped steps

HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def forbid_host_reads(monkeypatch) -> None:
    """Every way Python reads a tensor's value (each a device-to-host sync on a GPU) raises."""
    for name in HOST_READS:
        def read(self, *args, _name=name, **kwargs):
            raise AssertionError(f"Tensor.{_name}() called: a host sync")
        monkeypatch.setattr(torch.Tensor, name, read)


def exercise(opt: Sophia, params: list[nn.Parameter], gen: torch.Generator) -> None:
    """Estimates (one non-finite) and three steps: found_inf absent, 0 and 1; with
    stats_every=2 every combination is counted in one call of two in a row, not in the other."""
    h_hat = [torch.rand(p.shape, generator=gen) for p in params]
    opt.update_hessian(h_hat)
    h_hat[0][0] = float("nan")
    opt.update_hessian(h_hat)
    for flag in (None, 0.0, 1.0):
        if flag is None:
            vars(opt).pop("found_inf", None)
        else:
            opt.found_inf = torch.tensor(flag)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


@pytest.mark.parametrize("impl", IMPLS)
def test_step_and_update_hessian_never_read_a_tensor_on_the_host(impl, monkeypatch):
    gen = torch.Generator().manual_seed(30)
    params = [nn.Parameter(torch.randn(s, generator=gen)) for s in [(4, 3), (5,)]]
    opt = SophiaG(params, lr=0.1, impl=impl, stats_every=2)
    exercise(opt, params, gen)  # warm-up: the compiled graphs are built (that may read values)
    forbid_host_reads(monkeypatch)
    with pytest.raises(AssertionError, match="host sync"):
        torch.ones(()).item()  # the trap works
    for _ in range(2):  # steps 4-9: found_inf absent, 0 and 1, each counted once and not once
        exercise(opt, params, gen)
    monkeypatch.undo()
    stats = opt.stats()  # the one read, by design
    assert stats["skipped_estimates"] == 3 and 0 < stats["win_rate"] <= 1


@pytest.mark.parametrize("impl", IMPLS)
def test_found_inf_nonzero_leaves_everything_untouched_and_zero_is_an_ordinary_step(impl):
    gen = torch.Generator().manual_seed(31)
    values = [torch.randn(s, generator=gen, dtype=torch.float64) for s in [(6, 2), (3,)]]
    plain = [nn.Parameter(v.clone()) for v in values]
    flagged = [nn.Parameter(v.clone()) for v in values]
    opts = [SophiaG(ps, lr=0.1, rho=0.5, weight_decay=0.1, impl=impl, stats_every=1) for ps in (plain, flagged)]
    flagged_opt = opts[1]
    for step, flag in enumerate([0.0, 1.0, 0.0, 1.0, 0.0]):
        if step % 2 == 0:
            h_hat = [torch.rand(v.shape, generator=gen, dtype=torch.float64) for v in values]
            for opt in opts:
                opt.update_hessian(h_hat)
        grads = [torch.randn(v.shape, generator=gen, dtype=torch.float64) for v in values]
        flagged_opt.found_inf = torch.tensor(flag)
        if flag:
            grads[0][0, 0] = float("inf")  # what an overflow looks like; the flag says skip
            before = [(p.detach().clone(), flagged_opt.state[p]["exp_avg"].clone(),
                       flagged_opt.state[p]["hessian"].clone()) for p in flagged]
            for p, g in zip(flagged, grads):
                p.grad = g.clone()
            flagged_opt.step()
            for p, (theta, m, h) in zip(flagged, before):
                assert torch.equal(p.detach(), theta)
                assert torch.equal(flagged_opt.state[p]["exp_avg"], m)
                assert torch.equal(flagged_opt.state[p]["hessian"], h)
        else:  # the same step as an optimizer that never heard of found_inf
            for opt, ps in zip(opts, (plain, flagged)):
                for p, g in zip(ps, grads):
                    p.grad = g.clone()
                opt.step()
            for a, b in zip(plain, flagged):
                assert torch.equal(a.detach(), b.detach())
    plain_stats, flagged_stats = (opt.stats() for opt in opts)
    assert flagged_stats == plain_stats  # the skipped steps are not samples of the win rate
    # state["step"] counts the applied steps only, as fused AdamW's does.
    assert flagged_opt.state[flagged[0]]["step"].item() == opts[0].state[plain[0]]["step"].item() == 3


# ----------------------------------------------------------------------------- Hutchinson

def replicated_param(gen: torch.Generator, copies: int, *shape: int) -> nn.Parameter:
    """One float64 tensor, repeated `copies` times along a new first dimension."""
    value = torch.randn(shape, generator=gen, dtype=torch.float64)
    return nn.Parameter(value.expand(copies, *shape).clone())


def per_copy(estimate: list[torch.Tensor], copies: int) -> torch.Tensor:
    """(copies, d): each copy's coordinates, flattened in parameter order."""
    return torch.cat([e.reshape(copies, -1) for e in estimate], dim=1)


class ReplicatedMLP(nn.Module):
    """`copies` identical copies of one 2-layer softmax classifier (float64) side by side:
    model(x, y) -> (logits (R, N, C), loss), the loss being the SUM over copies of each
    copy's mean cross-entropy on (x, y). Its Hessian is block diagonal with every block the
    Hessian of one copy, and u ~ N(0, I) is independent across blocks, so one Hutchinson
    estimate holds R independent draws of one copy's estimate."""

    def __init__(self, copies: int = 1, d_in: int = 3, d_hidden: int = 4, n_classes: int = 3, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.w1, self.b1 = replicated_param(gen, copies, d_in, d_hidden), replicated_param(gen, copies, d_hidden)
        self.w2, self.b2 = replicated_param(gen, copies, d_hidden, n_classes), replicated_param(gen, copies, n_classes)

    def forward(self, x, y=None):
        hidden = torch.tanh(torch.einsum("ni,rih->rnh", x, self.w1) + self.b1[:, None])
        logits = torch.einsum("rnh,rhc->rnc", hidden, self.w2) + self.b2[:, None]
        loss = None
        if y is not None:
            copies, _, n_classes = logits.shape
            loss = F.cross_entropy(logits.reshape(-1, n_classes), y.repeat(copies)) * copies
        return logits, loss


def flat_fn(model: nn.Module, fn):
    """fn(model output) as a function of one flat parameter vector, and that vector."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    sizes = [p.numel() for _, p in model.named_parameters()]

    def call(flat, *args):
        params = {n: c.view(s) for n, c, s in zip(names, torch.split(flat, sizes), shapes)}
        return fn(functional_call(model, params, args))

    return call, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def test_hutchinson_mean_matches_the_exact_hessian_diagonal_within_derived_standard_errors():
    gen = torch.Generator().manual_seed(7)
    batches = [(torch.randn(6, 3, generator=gen, dtype=torch.float64), torch.randint(0, 3, (6,), generator=gen))
               for _ in range(2)]
    loss_of, flat = flat_fn(ReplicatedMLP(copies=1), lambda out: out[1])
    # The estimator targets the Hessian of the mean loss over the batches (float64, exact).
    H = hessian(lambda f: sum(loss_of(f, x, y) for x, y in batches) / len(batches))(flat)
    diag = H.diagonal()
    # For u ~ N(0, I): Var(u_i (H u)_i) = 2 H_ii^2 + sum_{j != i} H_ij^2 = H_ii^2 + ||H_i||^2.
    var = diag ** 2 + (H ** 2).sum(1)
    copies, calls = 2000, 4
    model = ReplicatedMLP(copies=copies)
    samples = torch.cat([per_copy(hutchinson_hessian(model, list(model.parameters()), batches, gen), copies)
                         for _ in range(calls)])
    draws = copies * calls
    se = (var / draws).sqrt()
    z = (samples.mean(0) - diag) / se
    assert z.abs().max() < 5.0, f"max |z| = {z.abs().max():.2f}"  # 5 sigma over 31 coordinates
    # Gaussian probes (not Rademacher, whose variance lacks the 2 H_ii^2 term): the spread
    # matches the formula above.
    assert (samples.var(0).sum() / var.sum()).item() == pytest.approx(1.0, abs=0.1)
    # The test has power: the tolerance is far below the size of the diagonal.
    assert se.max() < 0.05 * diag.abs().max()


def test_hutchinson_is_u_times_h_u_for_the_generators_draw():
    gen = torch.Generator().manual_seed(9)
    model = ReplicatedMLP(copies=1)
    x, y = torch.randn(5, 3, generator=gen, dtype=torch.float64), torch.randint(0, 3, (5,), generator=gen)
    loss_of, flat = flat_fn(model, lambda out: out[1])
    H = hessian(lambda f: loss_of(f, x, y))(flat)
    params = list(model.parameters())
    est = hutchinson_hessian(model, params, [(x, y)], torch.Generator().manual_seed(10))
    gen = torch.Generator().manual_seed(10)
    u = torch.cat([torch.randn(p.shape, generator=gen, dtype=p.dtype).reshape(-1) for p in params])
    torch.testing.assert_close(per_copy(est, 1)[0], u * (H @ u), rtol=1e-10, atol=1e-12)


def test_hutchinson_on_a_tiny_gpt_is_finite_and_leaves_grads_alone():
    model = tiny_gpt()
    x = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(0))
    est = hutchinson_hessian(model, list(model.parameters()), [(x, x)], torch.Generator().manual_seed(0))
    assert all(torch.isfinite(e).all() and e.shape == p.shape for e, p in zip(est, model.parameters()))
    assert all(p.grad is None for p in model.parameters())
    assert any((e < 0).any() for e in est)  # unlike GNB, Hutchinson's estimates can be negative


class TinyAttentionLM(nn.Module):
    """A float64 language model with one causal attention head (F.scaled_dot_product_attention,
    whose flash kernel has no double backward): model(x, y) -> (logits, the mean cross-entropy
    over all tokens). model.GPT computes its loss in float32, too coarse for exact checks."""

    def __init__(self, vocab: int = 7, width: int = 4, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.emb = nn.Parameter(torch.randn(vocab, width, generator=gen, dtype=torch.float64))
        self.qkv = nn.Parameter(torch.randn(width, 3 * width, generator=gen, dtype=torch.float64) / 2)
        self.head = nn.Parameter(torch.randn(width, vocab, generator=gen, dtype=torch.float64))
        self.bias = nn.Parameter(torch.randn(vocab, generator=gen, dtype=torch.float64))

    def forward(self, x, y=None):
        h = self.emb[x]
        q, k, v = (h @ self.qkv).unsqueeze(1).chunk(3, dim=-1)
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=True).squeeze(1)
        logits = torch.tanh(h + attended) @ self.head + self.bias
        loss = None if y is None else F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        return logits, loss


def token_batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 7, (8, 6), generator=gen), torch.randint(0, 7, (8, 6), generator=gen)


def test_hutchinson_weights_unequal_chunks_by_tokens_the_hvp_of_the_token_mean_loss_of_the_whole_batch():
    """Chunks of 3, 3 and 2 sequences: h_hat = u * (H u) with H the Hessian of the mean loss
    over all 48 tokens, not the mean of the three chunks' mean losses (float64, exact HVP)."""
    model = TinyAttentionLM()
    x, y = token_batch(27)
    chunks = [(x[:3], y[:3]), (x[3:6], y[3:6]), (x[6:], y[6:])]
    params = list(model.parameters())
    est = hutchinson_hessian(model, params, chunks, torch.Generator().manual_seed(28))
    gen = torch.Generator().manual_seed(28)
    u = tuple(torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params)
    names = [n for n, _ in model.named_parameters()]

    def hvp(loss_of):
        with sdpa_kernel(SDPBackend.MATH):  # the CPU's flash attention has no double backward
            return torch.autograd.functional.hvp(lambda *ps: loss_of(dict(zip(names, ps))),
                                                 tuple(p.detach() for p in params), u)[1]

    whole = hvp(lambda ps: functional_call(model, ps, (x, y))[1])
    for e, v, hv in zip(est, u, whole):
        torch.testing.assert_close(e, v * hv, rtol=1e-10, atol=1e-12)
    # The test has power: the equal-weight mean of the chunks' losses is far off.
    per_chunk = hvp(lambda ps: sum(functional_call(model, ps, c)[1] for c in chunks) / len(chunks))
    assert max((v * (a - b)).abs().max() for v, a, b in zip(u, whole, per_chunk)) > 1e-3


def _hutchinson_on_two_ranks(rank: int, init_file: str, result_dir: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        calls = []
        all_reduce = dist.all_reduce

        def counting_all_reduce(tensor, *args, **kwargs):
            calls.append(tensor.shape)
            return all_reduce(tensor, *args, **kwargs)

        dist.all_reduce = counting_all_reduce
        model = TinyAttentionLM()
        x, y = token_batch(29)
        # 4 sequences a rank, in chunks of 3 and 1 on rank 0 and of 2 and 2 on rank 1.
        bounds = [(0, 3), (3, 4)] if rank == 0 else [(4, 6), (6, 8)]
        est = hutchinson_hessian(model, list(model.parameters()), [(x[a:b], y[a:b]) for a, b in bounds],
                                 torch.Generator().manual_seed(30))
        torch.save({"estimate": est, "calls": calls}, Path(result_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_hutchinson_on_two_ranks_is_the_one_process_estimate_with_one_all_reduce(tmp_path):
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    torch.multiprocessing.spawn(_hutchinson_on_two_ranks, args=(str(tmp_path / "pg"), str(tmp_path)), nprocs=2)
    model = TinyAttentionLM()
    x, y = token_batch(29)
    single = hutchinson_hessian(model, list(model.parameters()), [(x, y)], torch.Generator().manual_seed(30))
    n_params = sum(p.numel() for p in model.parameters())
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert result["calls"] == [torch.Size([n_params])]  # H u of every tensor in one buffer
        for e, s in zip(result["estimate"], single):
            torch.testing.assert_close(e, s, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------- Hutchinson by finite differences

def relative_error(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    flat = [torch.cat([t.double().reshape(-1) for t in ts]) for ts in (got, want)]
    return ((flat[0] - flat[1]).norm() / flat[1].norm()).item()


def test_finite_difference_hvp_is_the_exact_one_up_to_order_eps_squared_under_the_flash_kernel():
    """float64, unequal chunks weighted by tokens as in the exact product: the central
    difference's error falls ~100x when eps falls 10x. It runs under the flash kernel, which
    has no double backward: the exact product needs the math kernel."""
    model = TinyAttentionLM()
    x, y = token_batch(27)
    chunks = [(x[:3], y[:3]), (x[3:6], y[3:6]), (x[6:], y[6:])]
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(31)
    v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in params]
    exact = sophia.hessian_vector_product(model, params, chunks, v)
    errors = []
    for eps in (1e-2, 1e-3):
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            errors.append(relative_error(sophia.fd_hessian_vector_product(model, params, chunks, v, eps), exact))
    assert errors[1] < 3e-5 and errors[1] < errors[0] / 50, errors
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):  # where a double backward fails
        grads = torch.autograd.grad(model(x, y)[1], params, create_graph=True)
        with pytest.raises(RuntimeError, match="derivative for .*flash"):
            torch.autograd.grad(sum((g * w).sum() for g, w in zip(grads, v)), params)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_finite_difference_hutchinson_on_a_float32_gpt_is_the_exact_estimate_within_the_measured_tolerance(dropout):
    """The default step on a float32 GPT: within 1% of the exact estimate for the same draw of
    u (docs/benchmarks.md measures ~1e-4 on the quick-start model). With dropout both
    passes replay the masks of the exact product's one pass (same kernel, same RNG state):
    different masks would put an O(1/eps) error in the difference. The parameters come back
    bitwise, .grad stays empty."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=16, vocab_size=32, n_layer=2, n_head=2, n_embd=32, dropout=dropout))
    params = list(model.parameters())
    gen = torch.Generator().manual_seed(32)
    x, y = (torch.randint(0, 32, (4, 16), generator=gen) for _ in range(2))
    chunks = [(x[:2], y[:2]), (x[2:], y[2:])]
    before = [p.detach().clone() for p in params]
    torch.manual_seed(1)
    exact = hutchinson_hessian(model, params, chunks, torch.Generator().manual_seed(33))
    torch.manual_seed(1)
    with sophia.math_attention():  # the kernel whose dropout masks the exact product drew
        estimate = sophia.hutchinson_fd_hessian(model, params, chunks, torch.Generator().manual_seed(33))
    assert relative_error(estimate, exact) < 1e-2
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert all(p.grad is None for p in params)


def test_finite_difference_restores_the_parameters_bitwise_when_a_pass_fails():
    model = TinyAttentionLM()
    params = list(model.parameters())
    before = [p.detach().clone() for p in params]
    calls = []

    def failing_second_pass(x, y):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return model(x, y)

    with pytest.raises(RuntimeError, match="out of memory"):
        sophia.hutchinson_fd_hessian(failing_second_pass, params, [token_batch(34)], torch.Generator().manual_seed(35))
    assert all(torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert all(p.grad is None for p in params)


def test_finite_difference_refuses_gradients_already_there_and_bad_steps():
    model = TinyAttentionLM()
    params = list(model.parameters())
    vectors = [torch.ones_like(p) for p in params]
    with pytest.raises(ValueError, match="one per parameter"):
        sophia.fd_hessian_vector_product(model, params, [token_batch(36)], vectors, [1e-3])
    with pytest.raises(ValueError, match="positive"):
        sophia.fd_hessian_vector_product(model, params, [token_batch(36)], vectors, 0.0)
    params[0].grad = torch.zeros_like(params[0])
    with pytest.raises(RuntimeError, match="empty .grad"):
        sophia.fd_hessian_vector_product(model, params, [token_batch(36)], vectors)


# ----------------------------------------------------------------------------- GNB

class ReplicatedTokenModel(nn.Module):
    """`copies` identical copies of one token model, logits = tanh(E[x]) W + b (float64,
    nonlinear in its parameters): model(x) -> (logits, None) for tokens x (R, B, T), copy r
    reading x[r]: one prediction per token."""

    def __init__(self, copies: int = 1, vocab: int = 5, width: int = 3, seed: int = 0):
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.emb = replicated_param(gen, copies, vocab, width)
        self.w, self.b = replicated_param(gen, copies, width, vocab), replicated_param(gen, copies, vocab)

    def forward(self, x, y=None):
        hidden = torch.tanh(self.emb[torch.arange(x.size(0))[:, None, None], x])  # (R, B, T, width)
        return torch.einsum("rbtd,rdv->rbtv", hidden, self.w) + self.b[:, None, None], None


def exact_gauss_newton_diagonal(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """diag(J^T S J) averaged over the x.numel() predictions, S = diag(p) - p p^T per prediction."""
    logits_of, flat = flat_fn(model, lambda out: out[0])
    V = model(x)[0].size(-1)
    J = jacrev(lambda f: logits_of(f, x))(flat).reshape(-1, V, flat.numel())  # (B, V, d)
    p = torch.softmax(logits_of(flat, x).reshape(-1, V), dim=-1)  # (B, V)
    # J^T S J has diagonal sum_v p_v J_vi^2 - (sum_v p_v J_vi)^2
    return ((p.unsqueeze(-1) * J ** 2).sum(1) - (p.unsqueeze(-1) * J).sum(1) ** 2).mean(0)


def test_gnb_mean_matches_the_exact_gauss_newton_diagonal_within_standard_errors():
    x = torch.tensor([[0, 1, 2, 3], [4, 0, 2, 1]])  # B = 8 predictions, every token used
    exact = exact_gauss_newton_diagonal(ReplicatedTokenModel(copies=1), x[None])
    copies, calls = 2000, 4
    model = ReplicatedTokenModel(copies=copies)
    gen = torch.Generator().manual_seed(12)
    # One call sees copies * B predictions: its gradient on copy r is 1/copies of that copy's
    # own mean-loss gradient, so copies * (its block) is one draw of one copy's GNB estimate.
    samples = torch.cat([copies * per_copy(gnb_hessian(model, list(model.parameters()), [x.expand(copies, 2, 4)],
                                                       gen), copies)
                         for _ in range(calls)]).double()
    draws = copies * calls
    se = samples.std(0) / math.sqrt(draws)
    z = (samples.mean(0) - exact) / se
    assert z.abs().max() < 5.0, f"max |z| = {z.abs().max():.2f}"  # 5 sigma over 35 coordinates
    assert (se < 0.05 * exact).all()  # the test has power: e.g. a factor B off could not pass


def test_gnb_is_b_times_the_squared_gradient_at_labels_sampled_from_the_softmax():
    """In float64: gnb_hessian hands backward the closed form softmax - onehot, autograd's
    cross-entropy differentiates exp(log_softmax); in float32 they differ in the last bits."""
    model = tiny_gpt().double()
    x = torch.randint(0, 16, (2, 8), generator=torch.Generator().manual_seed(13))
    params = list(model.parameters())
    est = gnb_hessian(model, params, [x], torch.Generator().manual_seed(14))
    u = torch.rand(x.numel(), generator=torch.Generator().manual_seed(14)).view(x.shape)
    logits, _ = model(x)
    y_hat = sample_labels(logits.detach(), u)
    grads = torch.autograd.grad(F.cross_entropy(logits.reshape(-1, 16), y_hat.reshape(-1)), params)
    for e, g in zip(est, grads):
        torch.testing.assert_close(e, x.numel() * g * g, rtol=1e-5, atol=1e-12)


def test_gnb_with_the_data_labels_is_b_times_the_squared_gradient_of_the_loss_the_empirical_fisher():
    model = tiny_gpt().double()
    gen = torch.Generator().manual_seed(13)
    x, y = torch.randint(0, 16, (2, 8), generator=gen), torch.randint(0, 16, (2, 8), generator=gen)
    params = list(model.parameters())
    est = gnb_hessian(model, params, [x], torch.Generator().manual_seed(14), targets=[y])
    logits, _ = model(x)  # the loss in float64 (model(x, y) computes it in float32)
    loss = F.cross_entropy(logits.reshape(-1, 16), y.reshape(-1))
    for e, g in zip(est, torch.autograd.grad(loss, params)):
        torch.testing.assert_close(e, x.numel() * g * g, rtol=1e-5, atol=1e-12)


def test_gnb_splits_the_batch_into_chunks_without_changing_the_estimate():
    model = tiny_gpt()
    x = torch.randint(0, 16, (4, 8), generator=torch.Generator().manual_seed(15))
    params = list(model.parameters())
    whole = gnb_hessian(model, params, [x], torch.Generator().manual_seed(16))
    chunked = gnb_hessian(model, params, [x[:1], x[1:]], torch.Generator().manual_seed(16))
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-10)


def test_gnb_is_non_negative_and_finite():
    model = tiny_gpt()
    gen = torch.Generator().manual_seed(17)
    for _ in range(5):
        x = torch.randint(0, 16, (2, 8), generator=gen)
        est = gnb_hessian(model, list(model.parameters()), [x], gen)
        assert all(torch.isfinite(e).all() and (e >= 0).all() for e in est)
        assert all(p.grad is None for p in model.parameters())


def test_gnb_grad_sync_is_off_before_every_chunk_but_the_last_and_on_before_the_last():
    events = []
    model = tiny_gpt()
    model.register_forward_pre_hook(lambda module, args: events.append("forward"))
    x = torch.randint(0, 16, (3, 8), generator=torch.Generator().manual_seed(32))
    params = list(model.parameters())
    chunked = gnb_hessian(model, params, [x[:1], x[1:2], x[2:]], torch.Generator().manual_seed(33),
                          grad_sync=lambda on: events.append(on))
    assert events == [False, "forward", False, "forward", True, "forward"]  # DDP reads it in forward
    whole = gnb_hessian(model, params, [x], torch.Generator().manual_seed(33))
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-10)


def test_sample_labels_frequencies_match_the_softmax():
    gen = torch.Generator().manual_seed(18)
    logits = torch.tensor([[2.0, 0.5, -1.0, 0.0, 1.0, -3.0], [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    n = 20000
    labels = sample_labels(logits.repeat_interleave(n, 0).view(2, n, 6), torch.rand(2, n, generator=gen))
    for row in range(2):
        counts = torch.bincount(labels[row], minlength=6).double()
        expected = n * torch.softmax(logits[row].double(), -1)
        chi2 = ((counts - expected) ** 2 / expected).sum().item()
        assert chi2 < 25.0, f"chi2 = {chi2:.1f} with 5 degrees of freedom"  # p ~ 1e-4


def test_sample_labels_is_deterministic_for_given_uniforms_and_monotone_in_u():
    gen = torch.Generator().manual_seed(19)
    logits = torch.randn(3, 10, generator=gen)
    u = torch.rand(3, 1000, generator=gen).sort(dim=1).values
    first = sample_labels(logits.unsqueeze(1).expand(3, 1000, 10), u)
    again = sample_labels(logits.unsqueeze(1).expand(3, 1000, 10).clone(), u.clone())
    assert torch.equal(first, again)
    assert (first.diff(dim=1) >= 0).all()  # inverse CDF


def test_sample_labels_with_u_close_to_one_never_yields_an_out_of_range_label():
    vocab = 50304
    gen = torch.Generator().manual_seed(20)
    logits = torch.randn(64, vocab, generator=gen) * 4
    logits[32:, -100:] = -float("inf")  # zero-probability tail
    below_one = torch.nextafter(torch.tensor(1.0), torch.tensor(0.0)).item()
    for u in (below_one, 1.0 - 1e-7, 1.0 - 1e-6, 1.0):
        labels = sample_labels(logits, torch.full((64,), u))
        assert labels.min() >= 0 and labels.max() < vocab
        assert (labels[32:] < vocab - 100).all()  # never a class with probability 0


# ----------------------------------------------------------------------------- the paper's toy problem (Fig. 2)

def toy_loss(t1: float, t2: float) -> float:
    """L(t1, t2) = 8(t1-1)^2(1.3 t1^2 + 2 t1 + 1) + 0.5 (t2-4)^2: sharp t1, flat t2,
    minimum (1, 4), saddle at t1 = 0 (L1'(0) = 0, L1''(0) < 0)."""
    return 8 * (t1 - 1) ** 2 * (1.3 * t1 ** 2 + 2 * t1 + 1) + 0.5 * (t2 - 4) ** 2


def toy_grad(t1: float, t2: float) -> list[float]:
    q = 1.3 * t1 ** 2 + 2 * t1 + 1
    return [16 * (t1 - 1) * q + 8 * (t1 - 1) ** 2 * (2.6 * t1 + 2), t2 - 4]


def toy_hessian_diagonal(t1: float, t2: float) -> list[float]:
    q = 1.3 * t1 ** 2 + 2 * t1 + 1
    return [16 * q + 32 * (t1 - 1) * (2.6 * t1 + 2) + 20.8 * (t1 - 1) ** 2, 1.0]


TOY_START, TOY_MIN, TOY_STEPS = (0.2, 0.0), (1.0, 4.0), 30


def toy_distance(t) -> float:
    return math.hypot(t[0] - TOY_MIN[0], t[1] - TOY_MIN[1])


def test_toy_derivatives_are_those_of_the_toy_loss():
    t = torch.tensor(TOY_START, dtype=torch.float64)
    g = torch.autograd.functional.jacobian(lambda v: toy_loss(v[0], v[1]), t)
    H = torch.autograd.functional.hessian(lambda v: toy_loss(v[0], v[1]), t)
    assert g.tolist() == pytest.approx(toy_grad(*TOY_START))
    assert H.diagonal().tolist() == pytest.approx(toy_hessian_diagonal(*TOY_START))
    assert toy_hessian_diagonal(*TOY_START)[0] < 0  # the start is in the concave region
    assert toy_hessian_diagonal(*TOY_MIN)[0] == pytest.approx(68.8)  # sharp: 68.8 vs 1


@pytest.mark.parametrize("impl", IMPLS)
def test_toy_problem_deterministic_sophia_reaches_the_minimum_while_gd_signgd_and_newton_do_not(impl):
    # Deterministic Sophia: exact gradient, exact Hessian diagonal as h every step
    # (beta1 = beta2 = 0), rho = 1 so an unclipped coordinate takes lr times the Newton
    # step, lr = 0.5: the largest step any coordinate can take. In the concave start
    # (h1 < 0) the update is lr sign(g): downhill, away from the saddle Newton heads to.
    lr = 0.5
    theta = torch.nn.Parameter(torch.tensor(TOY_START, dtype=torch.float64))
    opt = SophiaG([theta], lr=lr, betas=(0.0, 0.0), rho=1.0, weight_decay=0.0, impl=impl)
    first_close = None
    for step in range(1, TOY_STEPS + 1):
        t = theta.tolist()
        opt.update_hessian([torch.tensor(toy_hessian_diagonal(*t), dtype=torch.float64)])
        theta.grad = torch.tensor(toy_grad(*t), dtype=torch.float64)
        opt.step()
        if first_close is None and toy_distance(theta.tolist()) < 1e-2:
            first_close = step
    assert first_close is not None and first_close <= TOY_STEPS
    assert toy_distance(theta.tolist()) < 1e-6
    assert toy_loss(*theta.tolist()) < 1e-10

    # GD: the learning rate is limited by the sharp direction (stable only for lr < 2 / 68.8);
    # even at 0.99 x that limit, t2 has not come within 1 of 4 after 30 steps.
    t = list(TOY_START)
    gd_lr = 0.99 * 2 / toy_hessian_diagonal(*TOY_MIN)[0]
    for _ in range(TOY_STEPS):
        t = [ti - gd_lr * gi for ti, gi in zip(t, toy_grad(*t))]
    assert abs(t[1] - 4) > 1.0

    # SignGD: at Sophia's lr it bounces along the sharp t1 (0.7 <-> 1.2) and never gets
    # within 1e-2 of the minimum; at an lr small enough that the bounce stays small (0.05)
    # it crawls along the flat t2 and is still > 1 away after 30 steps.
    def sign_gd(step_lr):
        t, closest = list(TOY_START), float("inf")
        for _ in range(TOY_STEPS):
            t = [ti - step_lr * math.copysign(1.0, gi) * (gi != 0) for ti, gi in zip(t, toy_grad(*t))]
            closest = min(closest, toy_distance(t))
        return t, closest

    t, closest = sign_gd(lr)
    assert closest > 0.1 and abs(t[0] - 1) >= 0.2 - 1e-9
    t, _ = sign_gd(0.05)
    assert abs(t[1] - 4) > 1.0

    # Newton (theta - g / h, unclipped, every coordinate) converges to the saddle at t1 = 0.
    t = list(TOY_START)
    for _ in range(TOY_STEPS):
        t = [ti - gi / hi for ti, gi, hi in zip(t, toy_grad(*t), toy_hessian_diagonal(*t))]
    assert abs(t[0]) < 1e-6 and t[1] == pytest.approx(4.0)
    assert toy_distance(t) > 0.9


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.parametrize("impl", IMPLS)
def test_state_dict_round_trip_continues_exactly_like_an_uninterrupted_run(impl):
    def make():
        model = tiny_gpt()
        return model, SophiaG(model.param_groups(0.1), lr=1e-2, rho=0.05, impl=impl)

    def train(model, opt, steps, gen):
        for i in steps:
            x = torch.randint(0, 16, (2, 8), generator=gen)
            if i % 3 == 0:
                opt.update_hessian(gnb_hessian(model, all_params(opt), [x], gen))
            _, loss = model(x, x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

    model_a, opt_a = make()
    gen_a = torch.Generator().manual_seed(21)
    train(model_a, opt_a, range(8), gen_a)

    model_b, opt_b = make()
    gen_b = torch.Generator().manual_seed(21)
    train(model_b, opt_b, range(4), gen_b)
    buffer = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict(), "gen": gen_b.get_state()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    model_c, opt_c = make()  # fresh objects, as after a restart
    model_c.load_state_dict(saved["model"])
    opt_c.load_state_dict(saved["opt"])
    for p in all_params(opt_c):
        state = opt_c.state[p]
        assert state["step"].item() == 4
        assert state["hessian"].abs().sum() > 0
    gen_c = torch.Generator()
    gen_c.set_state(saved["gen"])
    train(model_c, opt_c, range(4, 8), gen_c)

    for a, c in zip(model_a.parameters(), model_c.parameters()):
        assert torch.equal(a, c)
    for pa, pc in zip(all_params(opt_a), all_params(opt_c)):
        for key in ("exp_avg", "hessian", "step"):
            assert torch.equal(opt_a.state[pa][key], opt_c.state[pc][key])


def test_after_load_state_dict_stats_every_samples_the_steps_it_would_have_without_the_restart():
    def make():
        p = nn.Parameter(torch.ones(4))
        return p, SophiaG([p], lr=0.1, stats_every=3, impl="foreach")

    p, opt = make()
    for _ in range(4):
        p.grad = torch.ones(4)
        opt.step()
    saved = opt.state_dict()
    p, opt = make()
    opt.load_state_dict(saved)
    for _ in range(2):  # steps 5 and 6: step 6 is counted
        p.grad = torch.ones(4)
        opt.step()
    assert opt.stats()["win_rate"] == 0.0  # h = 0: every coordinate clipped, and counted


# ----------------------------------------------------------------------------- DTensor

# The update runs on each DTensor's local shard; compiled, too.
@pytest.mark.parametrize("impl", IMPLS)
def test_sophiag_with_dtensor_parameters_equals_the_plain_tensor_result(tmp_path, impl):
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        gen = torch.Generator().manual_seed(22)
        values = [torch.randn(6, 4, generator=gen), torch.randn(4, generator=gen)]
        placements = [[Shard(0)], [Replicate()]]
        plain = [nn.Parameter(v.clone()) for v in values]
        sharded = [nn.Parameter(distribute_tensor(v.clone(), mesh, pl)) for v, pl in zip(values, placements)]
        opts = [SophiaG(ps, lr=0.05, rho=0.5, weight_decay=0.1, impl=impl, stats_every=1) for ps in (plain, sharded)]
        for step in range(4):
            grads = [torch.randn(v.shape, generator=gen) for v in values]
            h_hat = [torch.rand(v.shape, generator=gen) for v in values]
            for p, g in zip(plain, grads):
                p.grad = g.clone()
            for p, g, pl in zip(sharded, grads, placements):
                p.grad = distribute_tensor(g.clone(), mesh, pl)
            if step % 2 == 0:
                opts[0].update_hessian(h_hat)
                opts[1].update_hessian([distribute_tensor(h.clone(), mesh, pl) for h, pl in zip(h_hat, placements)])
            for opt in opts:
                opt.step()
        for p, d in zip(plain, sharded):
            assert isinstance(d, DTensor)
            assert torch.equal(p.detach(), d.detach().full_tensor())
            assert isinstance(opts[1].state[d]["hessian"], DTensor)
        plain_stats, sharded_stats = (opt.stats() for opt in opts)
        assert plain_stats == sharded_stats
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- misc

def test_step_with_closure_returns_the_loss_and_skips_parameters_without_grad():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    opt = SophiaG([a, b], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = (a ** 2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == 2.0
    assert torch.equal(b.detach(), torch.ones(2)) and b not in opt.state
    assert (a.detach() < 1).all()


def test_sophia_defaults_match_the_paper():
    """Sec. 3.1 and App. C.1: beta1 = 0.96, beta2 = 0.99, eps = 1e-12, weight decay 0.2,
    gamma (rho here) 0.05 for Sophia-G and 0.01 for Sophia-H."""
    p = [torch.nn.Parameter(torch.zeros(1))]
    g, h = SophiaG(p).defaults, SophiaH(p).defaults
    assert (g["rho"], g["weight_decay"], g["betas"], g["eps"]) == (0.05, 0.2, (0.96, 0.99), 1e-12)
    assert (h["rho"], h["weight_decay"], h["betas"], h["eps"]) == (0.01, 0.2, (0.96, 0.99), 1e-12)
    assert Sophia(p).defaults["betas"] == (0.96, 0.99)
    assert sophia.IMPLEMENTATIONS == IMPLS


def test_sophiag_and_sophiah_defaults_yield_to_keywords():
    p = [torch.nn.Parameter(torch.zeros(1))]
    for cls in (SophiaG, SophiaH):
        d = cls(p, lr=3e-4, betas=(0.9, 0.95), rho=0.2, weight_decay=0.0, clip=False).defaults
        assert (d["lr"], d["betas"], d["rho"], d["weight_decay"], d["clip"]) == (3e-4, (0.9, 0.95), 0.2, 0.0, False)
    with pytest.raises(TypeError):
        SophiaG(p, 1e-3)  # everything after params by keyword



def test_the_readme_snippet_trains_a_model_with_sophia_g_as_written():
    """README, "Using the optimizer in your own loop": the block that imports SophiaG runs
    verbatim and its model's loss falls well below chance (log 32 = 3.47)."""
    import math
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = [b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "import SophiaG" in b]
    assert len(blocks) == 1, f"{len(blocks)} README blocks import SophiaG"
    namespace: dict = {}
    exec(blocks[0], namespace)
    final = namespace["model"](namespace["x"], namespace["y"])[1].item()
    assert final < 0.5 * math.log(32), final
