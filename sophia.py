"""Sophia: Second-order Clipped Stochastic Optimization (Liu et al., 2023).

Two parts, kept apart so the training loop stays one loop:
  * the optimizer (`SophiaG`, `SophiaH`): every step
        m <- beta1 m + (1 - beta1) g
        theta <- theta - lr wd theta
        theta <- theta - lr clip(m / max(rho h, eps), -1, 1)
    and `update_hessian(h_hat)`, which folds one estimate into h <- beta2 h + (1 - beta2) h_hat;
  * the estimators (`gnb_hessian`, `hutchinson_hessian`, `hutchinson_fd_hessian`), functions
    of the model and a batch that return h_hat for every parameter; the loop calls one every
    k steps. Hutchinson's needs a Hessian-vector product: exact by double backward
    (`hessian_vector_product`: the eager module, the math attention kernel), or by a central
    difference of two ordinary gradients (`fd_hessian_vector_product`: the model as it
    trains, compiled, flash attention, DDP or FSDP2).

Two options exist only for the paper's ablations (Fig. 7b, 7c): clip=False drops the clip
(theta <- theta - lr m / max(rho h, eps)), and sqrt_hessian=True divides by rho sqrt(h),
with h an EMA of squared estimates (the AdaHessian-style pre-conditioner).

Where h <= 0 the ratio m / eps is huge, so the clip turns the update into lr sign(m): the
paper's fallback to sign momentum, never a step uphill (the authors' code's |m| / (rho h)
reverses the sign of m when h < 0).

The update is written once, over lists of tensors with torch's foreach ops (`_update`, as
torch's own optimizers are), and run two ways:
  "foreach"   eagerly: a few multi-tensor kernels per param group, no per-tensor Python loop;
  "compiled"  the same function through torch.compile: one fused pass over p, g, m, h per
              tensor (lr lives in a 0-dim tensor so a changing schedule does not recompile).
impl="auto" picks "compiled" wherever torch.compile works on the parameters' device (CUDA
with triton; the CPU with the C++ compiler inductor needs), else "foreach". The same holds for
update_hessian's fold and the win-rate count.

This module needs nothing but torch: `pip install .` installs it alone as `sophia`.
"""

import contextlib
import functools
import warnings
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.optim.optimizer import ParamsT

__all__ = ["FD_EPSILON", "FD_EPSILON_AUTOCAST", "IMPLEMENTATIONS", "Sophia", "SophiaG", "SophiaH", "fd_hessian_vector_product", "gnb_hessian",
           "hessian_vector_product", "hutchinson_fd_hessian", "hutchinson_hessian", "math_attention", "sample_labels"]

IMPLEMENTATIONS = ("foreach", "compiled")


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2): Sophia's update is elementwise, so each rank
    updates its own shard; plain tensors pass through."""
    return t.to_local() if isinstance(t, DTensor) else t


class Sophia(torch.optim.Optimizer):
    """Sophia's update rule; the Hessian estimate comes from outside via update_hessian().

    Args (all but params by keyword):
        params: parameters or param groups, as for any torch optimizer.
        lr: peak learning rate; the largest step any coordinate can take.
        betas: (beta1, beta2): EMA rates of the gradient and of the Hessian estimates. The
            paper's (0.96, 0.99) (Sec. 3.1, App. C.1); the authors' code
            (github.com/Liuhong99/Sophia, sophia.py) defaults to (0.965, 0.99) instead.
        rho: the paper's gamma; scales h in the denominator and so sets how many
            coordinates are clipped (tune it so 10-50% are not).
        weight_decay: decoupled, applied as theta <- theta (1 - lr wd).
        eps: floor of the denominator; also what makes h <= 0 fall back to sign(m).
        maximize: ascend instead of descend.
        impl: "foreach", "compiled", or "auto": compiled where torch.compile works on the
            parameters' device (probed once per device type with a one-line function; it
            needs triton on CUDA and a C++ compiler on the CPU), else foreach. Every param
            group (its shapes and float hyperparameters) is a graph of its own; past
            torch._dynamo's recompile limit (8 graphs by default, e.g. after many models in
            one process) torch warns and runs the same function eagerly, i.e. foreach.
        stats_every: count the unclipped coordinates (stats()["win_rate"]) on every
            stats_every-th step, e.g. the logging interval (train.py's choice); None (the
            default) never counts, so stats()["win_rate"] is NaN. A count is one more read of
            m and h, about a quarter of the compiled update's memory traffic; win_rate is the
            fraction over the counted steps.
        clip: ablation only; False updates by lr m / max(rho h, eps) unclipped.
        sqrt_hessian: ablation only; True divides by max(rho sqrt(h), eps): feed it squared
            estimates for an AdaHessian-style pre-conditioner.
    Sophia's own rho and weight_decay defaults are those of the authors' code; SophiaG and
    SophiaH default to the paper's.

    Skipping a step without a host sync (the protocol of torch's fused AdamW): set
    `optimizer.found_inf` to a 0-dim float tensor on the parameters' device before step();
    where it is nonzero (e.g. a gradient overflowed) the step leaves the parameters, m and h
    exactly as they were and is left out of stats(); where it is 0 the step is ordinary. The
    flag is read on the device, inside the update (torch.where), never by the host.
    state["step"] (on the parameter's device, like fused AdamW's) counts the applied steps;
    which steps stats_every samples is decided by the calls of step(), on the host.
    """

    def __init__(self, params: ParamsT, *, lr: float = 1e-4, betas: tuple[float, float] = (0.96, 0.99),
                 rho: float = 0.04, weight_decay: float = 1e-1, eps: float = 1e-12,
                 maximize: bool = False, impl: str = "auto", stats_every: int | None = None,
                 clip: bool = True, sqrt_hessian: bool = False) -> None:
        if not lr >= 0.0:
            raise ValueError(f"invalid learning rate lr={lr}: must be >= 0")
        if not rho >= 0.0:
            raise ValueError(f"invalid rho={rho}: must be >= 0")
        if not eps > 0.0:  # eps = 0 makes m = 0 with h <= 0 a 0/0 = NaN update
            raise ValueError(f"invalid eps={eps}: must be > 0")
        if not weight_decay >= 0.0:
            raise ValueError(f"invalid weight_decay={weight_decay}: must be >= 0")
        for i, beta in enumerate(betas):
            if not 0.0 <= beta < 1.0:
                raise ValueError(f"invalid beta{i + 1}={beta}: must lie in [0, 1)")
        if stats_every is not None and not (isinstance(stats_every, int) and stats_every >= 1):
            raise ValueError(f"invalid stats_every={stats_every!r}: must be None or an integer >= 1")
        if impl not in IMPLEMENTATIONS + ("auto",):
            raise ValueError(f"invalid impl={impl!r}: choose one of {IMPLEMENTATIONS + ('auto',)}")
        defaults = dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, eps=eps,
                        maximize=maximize, clip=clip, sqrt_hessian=sqrt_hessian)
        super().__init__(params, defaults)
        self.impl = impl
        self.stats_every = stats_every
        # Calls of step(), on the host, to pick the counted steps without reading state["step"].
        self._steps = 0
        # Statistics accumulate on the device and are read (one sync) by stats():
        # [unclipped coordinates, counted coordinates].
        self._stat_counts: Tensor | None = None
        self._stat_skipped_estimates: Tensor | None = None
        self._lr_tensors: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def _state(self, p: Tensor) -> dict:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.zeros((), dtype=torch.float32, device=_local(p).device)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _resolve_impl(self, device: torch.device) -> str:
        if self.impl != "auto":
            return self.impl
        return "compiled" if _compile_works(device.type) else "foreach"

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:  # checkpoints from before the ablation options
            group.setdefault("clip", True)
            group.setdefault("sqrt_hessian", False)
        for p, state in self.state.items():  # a checkpoint loads on the CPU
            if "step" in state:
                state["step"] = state["step"].to(_local(p).device)
        # The host counter resumes where the checkpoint left off (one read, at load time).
        steps = [s["step"] for s in self.state.values() if "step" in s]
        self._steps = int(torch.stack(steps).max()) if steps else 0

    @torch.no_grad()
    def update_hessian(self, h_hat: Sequence[Tensor | None]) -> None:
        """Fold one diagonal-Hessian estimate into the EMA: h <- beta2 h + (1 - beta2) h_hat.

        `h_hat` lists one tensor per parameter, in param-group order (None skips a
        parameter). If any entry is NaN or Inf the whole estimate is dropped (h keeps its
        value) and counted in stats()["skipped_estimates"]; this check costs no host sync
        (under FSDP2, one all-reduce of a flag, so every rank drops it or none).
        """
        pairs = []
        it = iter(h_hat)
        for group in self.param_groups:
            for p in group["params"]:
                try:
                    est = next(it)
                except StopIteration:
                    raise ValueError("h_hat has fewer entries than the optimizer has parameters") from None
                if est is not None:
                    pairs.append((group, self._state(p)["hessian"], est))
        if next(it, None) is not None:
            raise ValueError("h_hat has more entries than the optimizer has parameters")
        if not pairs:
            return
        hessians = [_local(h) for _, h, _ in pairs]
        estimates = [_local(e).to(h.dtype) for _, h, e in pairs]
        # min and max propagate NaN and show Inf: one read, no boolean temporaries.
        finite = torch.isfinite(torch.stack([x for e in estimates if e.numel() for x in torch.aminmax(e)]
                                            or [torch.zeros((), device=hessians[0].device)])).all()
        sharded = [h for _, h, _ in pairs if isinstance(h, DTensor)]
        if sharded:  # FSDP2: each rank sees its shards only; drop the estimate on every rank or none
            agreed = finite.float()
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN, group=sharded[0].device_mesh.get_group())
            finite = agreed.bool()
        if self._stat_skipped_estimates is None:
            self._stat_skipped_estimates = torch.zeros((), device=hessians[0].device)
        self._stat_skipped_estimates += (~finite).float()
        fold = _fold_hessian if self._resolve_impl(hessians[0].device) == "foreach" else _compiled(_fold_hessian)
        for weight in dict.fromkeys(1.0 - group["betas"][1] for group, _, _ in pairs):  # one call per beta2
            chosen = [i for i, (group, _, _) in enumerate(pairs) if 1.0 - group["betas"][1] == weight]
            fold([hessians[i] for i in chosen], [estimates[i] for i in chosen], finite, weight)

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One Sophia step for every parameter with a gradient; no host sync (see the class
        docstring for `found_inf`)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._steps += 1
        count = self.stats_every is not None and self._steps % self.stats_every == 0
        found_inf = getattr(self, "found_inf", None)
        if not isinstance(found_inf, Tensor):
            found_inf = None
        for group in self.param_groups:
            params, grads, exp_avgs, hessians, steps = [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Sophia does not support sparse gradients")
                state = self._state(p)
                params.append(_local(p))
                grads.append(_local(p.grad))
                exp_avgs.append(_local(state["exp_avg"]))
                hessians.append(_local(state["hessian"]))
                steps.append(state["step"])
            if not params:
                continue
            torch._foreach_add_(steps, 1.0 if found_inf is None else 1.0 - (found_inf != 0).float())
            if self._resolve_impl(params[0].device) == "foreach":
                update, count_unclipped = _update, _count_unclipped
            else:
                update, count_unclipped = _compiled(_update), _compiled(_count_unclipped)
            # lr in float64 for float64 parameters: in float32, 1 - lr wd loses ~1e-8.
            lr = self._lr_tensor(group["lr"], params[0].device, torch.promote_types(params[0].dtype, torch.float32))
            denominator = dict(rho=group["rho"], eps=group["eps"], sqrt_hessian=group["sqrt_hessian"])
            update(params, grads, exp_avgs, hessians, lr, found_inf, beta1=group["betas"][0],
                   weight_decay=group["weight_decay"], maximize=group["maximize"], clip=group["clip"], **denominator)
            if not count:
                continue
            unclipped = count_unclipped(exp_avgs, hessians, **denominator)
            counts = torch.stack([unclipped, torch.full_like(unclipped, sum(p.numel() for p in params))])
            if found_inf is not None:  # a skipped step is not a sample of the win rate
                counts = counts * (found_inf == 0)
            self._stat_counts = counts if self._stat_counts is None else self._stat_counts + counts
        return loss

    def _lr_tensor(self, lr: float, device: torch.device, dtype: torch.dtype) -> Tensor:
        t = self._lr_tensors.get((device, dtype))
        if t is None:
            t = self._lr_tensors[(device, dtype)] = torch.zeros((), device=device, dtype=dtype)
        t.fill_(lr)
        return t

    @torch.no_grad()
    def stats(self, reset: bool = True) -> dict[str, float]:
        """Statistics since the last reset (one host sync; all-reduced under torch.distributed
        when the parameters are sharded DTensors):
            win_rate          fraction of coordinate updates that were not clipped
            hessian_norm      l2 norm of the Hessian EMA h
            skipped_estimates estimates dropped by update_hessian for non-finite values
        """
        hessians = [self.state[p]["hessian"] for g in self.param_groups for p in g["params"]
                    if "hessian" in self.state[p]]
        sharded = any(isinstance(h, DTensor) for h in hessians)
        device = hessians[0].device if hessians else torch.device("cpu")
        if hessians:
            local = [_local(h) for h in hessians]
            sq = torch.stack([torch.linalg.vector_norm(h.float()) ** 2 for h in local]).sum()
        else:
            sq = torch.zeros((), device=device)
        counts = (self._stat_counts.to(device) if self._stat_counts is not None
                  else torch.zeros(2, dtype=torch.float64, device=device))
        skipped = (self._stat_skipped_estimates if self._stat_skipped_estimates is not None
                   else torch.zeros((), device=device))
        values = torch.stack([counts[0], sq.double(), counts[1], skipped.double().to(device)])
        if sharded and dist.is_initialized():
            dist.all_reduce(values[:3])
        unclipped_v, sq_v, coords_v, skipped_v = values.tolist()
        if reset:
            self._stat_counts = None
            self._stat_skipped_estimates = None
        return dict(win_rate=unclipped_v / coords_v if coords_v else float("nan"),
                    hessian_norm=sq_v ** 0.5, skipped_estimates=skipped_v)


class SophiaG(Sophia):
    """Sophia with the Gauss-Newton-Bartlett estimator (pair it with `gnb_hessian`).
    The paper's defaults (App. C.1): betas (0.96, 0.99), rho 0.05, weight decay 0.2; any
    keyword of `Sophia` overrides them."""

    def __init__(self, params: ParamsT, **kwargs: Any) -> None:
        super().__init__(params, **{"betas": (0.96, 0.99), "rho": 0.05, "weight_decay": 0.2, **kwargs})


class SophiaH(Sophia):
    """Sophia with Hutchinson's estimator (pair it with `hutchinson_hessian`).
    The paper's defaults (App. C.1): betas (0.96, 0.99), rho 0.01, weight decay 0.2; any
    keyword of `Sophia` overrides them."""

    def __init__(self, params: ParamsT, **kwargs: Any) -> None:
        super().__init__(params, **{"betas": (0.96, 0.99), "rho": 0.01, "weight_decay": 0.2, **kwargs})


# ----------------------------------------------------------------------------- the update

def _denominators(hessians: list[Tensor], rho: float, eps: float, sqrt_hessian: bool) -> list[Tensor]:
    """max(rho h, eps), or max(rho sqrt(h), eps) for the AdaHessian-style ablation."""
    scaled = torch._foreach_mul(torch._foreach_sqrt(hessians) if sqrt_hessian else hessians, rho)
    torch._foreach_clamp_min_(scaled, eps)
    return scaled


def _update(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], hessians: list[Tensor],
            lr: Tensor, found_inf: Tensor | None, *, beta1: float, rho: float, weight_decay: float, eps: float,
            maximize: bool, clip: bool, sqrt_hessian: bool) -> None:
    """Sophia's update of every tensor of a group, in place, over lists (foreach kernels
    eagerly; compiled, one fused pass per tensor that reads p, g, m, h and writes p, m:
    24 bytes per fp32 parameter):
        m <- lerp(m, g, 1 - beta1);  p <- p (1 - lr wd) - lr clip(m / max(rho h, eps), -1, 1)
    Where the 0-dim `found_inf` is nonzero, p and m stay exactly as they were: m by a select
    (a NaN or Inf in g cannot leak through it, as it would through lerp or a product with 0;
    torch has no foreach select, so it is one where per tensor), p by lr = 0, which leaves
    p (1 - 0) - 0 x (finite ratio) = p bitwise: the ratio is finite where m and h are, and
    update_hessian and this select keep them so."""
    grads = torch._foreach_neg(grads) if maximize else grads
    if found_inf is None:
        torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    else:
        skip = found_inf != 0
        stepped = torch._foreach_lerp(exp_avgs, grads, 1.0 - beta1)
        torch._foreach_copy_(exp_avgs, [torch.where(skip, m, new) for m, new in zip(exp_avgs, stepped)])
        lr = lr * ~skip
    ratios = torch._foreach_div(exp_avgs, _denominators(hessians, rho, eps, sqrt_hessian))
    if clip:
        torch._foreach_clamp_min_(ratios, -1.0)
        torch._foreach_clamp_max_(ratios, 1.0)
    torch._foreach_mul_(ratios, lr)
    torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    torch._foreach_sub_(params, ratios)


def _count_unclipped(exp_avgs: list[Tensor], hessians: list[Tensor], *, rho: float, eps: float,
                     sqrt_hessian: bool) -> Tensor:
    """Coordinates with |m / max(rho h, eps)| < 1 (NaN counts as clipped), from the updated m:
    a 0-dim float64 tensor. Kept out of the update because inductor does not fuse a
    reduction into a loop that stores: counting there would re-read m, g and h (12 bytes per
    fp32 parameter) instead of the new m and h (8 bytes)."""
    ratios = torch._foreach_abs(torch._foreach_div(exp_avgs, _denominators(hessians, rho, eps, sqrt_hessian)))
    return torch.stack([(r < 1).sum() for r in ratios]).sum().double()


def _fold_hessian(hessians: list[Tensor], estimates: list[Tensor], finite: Tensor, weight: float) -> None:
    """h <- lerp(h, h_hat, weight) where the whole estimate is finite, else lerp(h, h, .) = h
    exactly: a select, so a NaN in h_hat never reaches h and the flag is never read on the
    host. Compiled, one kernel per tensor reads h and h_hat and writes h."""
    torch._foreach_lerp_(hessians, [torch.where(finite, e, h) for h, e in zip(hessians, estimates)], weight)


@functools.cache
def _compiled(fn: Callable) -> Callable:
    # Not fullgraph=True: with it, the recompile limit is a hard error instead of a fallback
    # to eager. The tests check that each function is one graph.
    return torch.compile(fn, dynamic=False)


def _probe(x: Tensor) -> Tensor:
    return x * 2.0 + 1.0


@functools.cache
def _compile_works(device_type: str) -> bool:
    """Whether torch.compile runs on this device type, found by compiling `_probe`: inductor
    needs triton on CUDA and a C++ compiler on the CPU, and dynamo a supported Python."""
    try:
        torch.compile(_probe, fullgraph=True, dynamic=False)(torch.ones(2, device=device_type))
    except Exception as error:  # whatever stops inductor, the foreach update still works
        warnings.warn(f"torch.compile does not work on {device_type} ({type(error).__name__}: {error}); "
                      "Sophia(impl='auto') uses its foreach update", RuntimeWarning)
        return False
    return True


# ----------------------------------------------------------------------------- estimators

def math_attention() -> contextlib.AbstractContextManager:
    """Force PyTorch's math attention kernel: the flash and memory-efficient kernels have no
    double backward, which the exact Hessian-vector product (`hutchinson_hessian`) needs."""
    return sdpa_kernel(SDPBackend.MATH)


# Rows of the logits handled at once by sample_labels and _cross_entropy_grad: their float32
# temporaries are ROW_BLOCK x V (about 200 MB for GPT-2's vocabulary), never the whole batch's.
ROW_BLOCK = 1024


def sample_labels(logits: Tensor, uniform: Tensor) -> Tensor:
    """Draw one label per row of `logits` (..., V) from softmax(logits) by inverting the
    CDF at `uniform` (...,): a float32 softmax and cumsum per block of rows, no host sync,
    and the draw is a pure function of the uniforms (so it is reproducible across ranks
    and restarts). torch.distributions.Categorical would copy the logits and sync."""
    rows, u = logits.reshape(-1, logits.size(-1)), uniform.reshape(-1)
    labels = torch.empty(rows.size(0), dtype=torch.long, device=logits.device)
    for start in range(0, rows.size(0), ROW_BLOCK):
        cdf = torch.softmax(rows[start:start + ROW_BLOCK], dim=-1, dtype=torch.float32).cumsum_(dim=-1)
        # Scale by the last cdf value so rounding in the sum cannot put u past the end.
        target = (u[start:start + ROW_BLOCK].to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)
        labels[start:start + ROW_BLOCK] = torch.searchsorted(cdf, target).squeeze(-1)
    return labels.clamp_(max=logits.size(-1) - 1).view(uniform.shape)


def _cross_entropy_grad(logits: Tensor, labels: Tensor, scale: float) -> Tensor:
    """d/dlogits of scale x the summed cross-entropy against `labels`: scale (softmax - onehot),
    in the logits' dtype, computed in float32 (float64 for float64 logits) per block of rows. Handing it to
    logits.backward() skips autograd's cross-entropy, whose float32 copies of the logits
    (forward, saved log-softmax, gradient) are what the estimate's memory peak was made of."""
    rows, flat = logits.reshape(-1, logits.size(-1)), labels.reshape(-1)
    grad, dtype = torch.empty_like(rows), torch.promote_types(logits.dtype, torch.float32)
    for start in range(0, rows.size(0), ROW_BLOCK):
        block = torch.softmax(rows[start:start + ROW_BLOCK], dim=-1, dtype=dtype)
        picked = flat[start:start + ROW_BLOCK].unsqueeze(-1)
        block.scatter_add_(-1, picked, torch.full(picked.shape, -1.0, dtype=dtype, device=block.device))
        grad[start:start + ROW_BLOCK] = block.mul_(scale)
    return grad.view(logits.shape)


def gnb_hessian(model: torch.nn.Module, params: list[Tensor], inputs: list[Tensor], generator: torch.Generator,
                rank: int = 0, world_size: int = 1, autocast: contextlib.AbstractContextManager | None = None,
                loss_scale: float = 1.0, targets: list[Tensor] | None = None, *,
                grad_sync: Callable[[bool], None] | None = None) -> list[Tensor | None]:
    """Gauss-Newton-Bartlett estimate (paper Algorithm 2): h_hat = B g_hat * g_hat, where
    g_hat is the gradient of the mean cross-entropy against labels sampled from the
    model's own softmax over B predictions (all tokens of the estimator's batch, over all
    ranks). The gradient is not clipped.

    `model(x)` returns (logits, _); `inputs` are this rank's input chunks (B_i, T). The
    gradient goes through the ordinary backward into .grad, so a DDP or FSDP2 module
    averages it over ranks itself (and FSDP2's sharded DTensor parameters work); .grad must
    be empty on entry and is left empty. `generator` must be seeded identically on every
    rank: each rank draws the uniforms of the whole global batch and uses its own slice, so
    2 ranks compute exactly what one process computes on the same data. `autocast` is a
    context for the forward passes, `loss_scale` a constant the loss is multiplied by before
    backward (fp16) and the estimate divided by.

    `grad_sync`, if given, is called before each chunk's forward (DDP reads its flag there)
    with False for every chunk but the last and True for the last, so that the gradient is
    all-reduced once: e.g. `lambda on: setattr(ddp_model, "require_backward_grad_sync", on)`
    for DDP, `fsdp_model.set_requires_gradient_sync` for FSDP2. None leaves the module
    alone: still correct, only slower under DDP (one all-reduce per chunk).

    With `targets` (the data's labels, aligned with `inputs`) nothing is sampled: B g * g of
    the ordinary loss, the empirical Fisher diagonal (the paper's E-F ablation, Fig. 7b).
    """
    if any(p.grad is not None for p in params):
        raise RuntimeError("gnb_hessian needs empty .grad: call it before the step's backward "
                           "or after zero_grad(set_to_none=True)")
    local_preds = sum(x.numel() for x in inputs)
    global_preds = local_preds * world_size
    uniforms = torch.rand(global_preds, generator=generator, device=generator.device)
    uniforms = uniforms[rank * local_preds:(rank + 1) * local_preds].to(inputs[0].device)
    offset = 0
    for i, x in enumerate(inputs):
        if grad_sync is not None:
            grad_sync(i == len(inputs) - 1)
        with autocast or contextlib.nullcontext():
            logits, _ = model(x)
        u = uniforms[offset:offset + x.numel()].view(x.shape)
        offset += x.numel()
        y = sample_labels(logits.detach(), u) if targets is None else targets[i]
        # The gradient of the mean cross-entropy over all local tokens, loss-scaled.
        logits.backward(_cross_entropy_grad(logits.detach(), y, loss_scale / local_preds))
        del logits
    scale = global_preds / (loss_scale * loss_scale)
    h_hat = []
    for p in params:
        h_hat.append(None if p.grad is None else scale * p.grad * p.grad)
        p.grad = None
    return h_hat


def hutchinson_hessian(model: Callable, params: list[Tensor], batches: list[tuple[Tensor, Tensor]],
                       generator: torch.Generator, autocast: contextlib.AbstractContextManager | None = None,
                       loss_scale: float = 1.0) -> list[Tensor]:
    """Hutchinson estimate (paper Algorithm 1): h_hat = u * (H u), u ~ N(0, I), H the Hessian
    of the mean loss over all tokens of `batches` (this rank's (x, y) chunks, of any sizes:
    each chunk's mean loss, as `model(x, y)` returns it, is weighted by its y.numel()) and
    over ranks (averaged: equal token counts on every rank make it the global token mean).

    H u is exact (`hessian_vector_product`): pass the uncompiled, unwrapped module.
    `generator` must be seeded identically on every rank so u is shared. The reference
    `hutchinson_fd_hessian` is held to.
    """
    u = [_shared_normal(p, generator) for p in params]
    return [v * hv for v, hv in zip(u, hessian_vector_product(model, params, batches, u, autocast, loss_scale))]


def hessian_vector_product(model: Callable, params: list[Tensor], batches: list[tuple[Tensor, Tensor]],
                           vectors: list[Tensor], autocast: contextlib.AbstractContextManager | None = None,
                           loss_scale: float = 1.0) -> list[Tensor]:
    """The exact H v, H the Hessian of the token-mean loss over `batches` and ranks (as in
    `hutchinson_hessian`), by double backward through torch.autograd.grad (not
    backward(create_graph=True), which leaks the graph into .grad) with the math attention
    kernel forced (`math_attention`). torch.compile and DDP have no double backward, and
    FSDP2 replaces the parameters by gathered copies: pass the plain module. Under
    torch.distributed the per-rank products are averaged in one flat all-reduce.
    `loss_scale` multiplies the loss (fp16) and divides the result.
    """
    hvp = [torch.zeros_like(p) for p in params]
    tokens = sum(y.numel() for _, y in batches)
    with math_attention():
        for x, y in batches:
            with autocast or contextlib.nullcontext():
                _, loss = model(x, y)
            loss = loss * (loss_scale * y.numel() / tokens)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            dot = sum((g * v).sum() for g, v in zip(grads, vectors))
            for acc, hv in zip(hvp, torch.autograd.grad(dot, params)):
                acc.add_(hv)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flat = _flatten_dense_tensors(hvp)
        dist.all_reduce(flat)  # SUM, then divide: ReduceOp.AVG is not on every backend
        flat /= dist.get_world_size()
        hvp = _unflatten_dense_tensors(flat, hvp)
    return [hv / loss_scale for hv in hvp]


# The finite-difference steps, measured against the exact product (docs/benchmarks.md): the
# error is truncation, O(eps^2), above them and rounding of the two gradients below them.
FD_EPSILON = 3e-5  # float32
FD_EPSILON_AUTOCAST = 3e-4  # a bfloat16 (or float16) forward: its rounding needs a larger step


def hutchinson_fd_hessian(model: Callable, params: list[Tensor], batches: list[tuple[Tensor, Tensor]],
                          generator: torch.Generator, autocast: contextlib.AbstractContextManager | None = None,
                          loss_scale: float = 1.0, *, epsilon: float | None = None,
                          grad_sync: Callable[[bool], None] | None = None) -> list[Tensor | None]:
    """Hutchinson estimate (paper Algorithm 1) as `hutchinson_hessian`, h_hat = u * (H u), with
    H u by central difference (`fd_hessian_vector_product`): two ordinary forward and backward
    passes of `model` as it trains (compiled, flash attention, DDP-wrapped or FSDP2-sharded).
    `generator` must be seeded identically on every rank: each rank draws u for the whole of
    each parameter and keeps its own shard (FSDP2), so u is shared and, for plain tensors,
    the same draw as `hutchinson_hessian`'s. Parameters without a gradient get None.
    `epsilon` None: FD_EPSILON_AUTOCAST under a torch.autocast context or for parameters
    below float32, else FD_EPSILON.
    """
    if epsilon is None:
        reduced = isinstance(autocast, torch.autocast) or any(torch.finfo(p.dtype).bits < 32 for p in params)
        epsilon = FD_EPSILON_AUTOCAST if reduced else FD_EPSILON
    u = [_shared_normal(p, generator) for p in params]
    hvp = fd_hessian_vector_product(model, params, batches, u, epsilon, autocast, loss_scale, grad_sync=grad_sync)
    return [None if hv is None else hv.mul_(v) for v, hv in zip(u, hvp)]


def fd_hessian_vector_product(model: Callable, params: list[Tensor], batches: list[tuple[Tensor, Tensor]],
                              vectors: list[Tensor], epsilon: float | Sequence[float] = FD_EPSILON,
                              autocast: contextlib.AbstractContextManager | None = None, loss_scale: float = 1.0, *,
                              grad_sync: Callable[[bool], None] | None = None) -> list[Tensor | None]:
    """H v ~ (g(theta + eps v) - g(theta - eps v)) / (2 eps), g the gradient of the token-mean
    loss over `batches` and ranks (as in `hessian_vector_product`): exact up to O(eps^2) and
    rounding. `vectors` hold this rank's part of v (the local shard of a DTensor parameter).

    The gradients go through .grad of an ordinary backward, so a DDP or FSDP2 module averages
    them over ranks itself; .grad must be empty on entry and is left empty. `grad_sync` is
    as for `gnb_hessian` (called before each chunk, True for the last only: one all-reduce
    per pass). The parameters are restored bitwise from a copy (a subtraction would not undo
    the addition exactly), and the RNG state is replayed so that both passes draw the same
    dropout masks. Extra memory while it runs: the copy and one gradient, each the size of
    this rank's parameters. `epsilon` is one step or one per parameter (eps_i: then the
    result is H E v / eps_i, E the diagonal of the steps). Parameters without a gradient get
    None. `loss_scale` multiplies the loss (fp16) and divides the result.
    """
    if any(p.grad is not None for p in params):
        raise RuntimeError("the finite-difference Hessian-vector product needs empty .grad: call it before the "
                           "step's backward or after zero_grad(set_to_none=True)")
    steps = [float(epsilon)] * len(params) if isinstance(epsilon, (int, float)) else [float(e) for e in epsilon]
    if len(steps) != len(params) or not all(e > 0 for e in steps):
        raise ValueError(f"epsilon must be one positive float or one per parameter ({len(params)}), not {epsilon!r}")
    if isinstance(model, torch.nn.Module):
        for module in model.modules():
            # FSDP2 keeps a root's gathered parameters after a forward without backward (an
            # evaluation), and its next forward would use them: the perturbation of the shards
            # must be gathered.
            if isinstance(module, FSDPModule):
                module.reshard()
    with torch.no_grad():
        local = [_local(p.detach()) for p in params]
        saved = [t.clone() for t in local]
    rng = _rng_states(local[0].device)
    differences: list[Tensor | None] = []
    try:
        for sign in (1.0, -1.0):
            with torch.no_grad():
                for t, s, v, e in zip(local, saved, vectors, steps):
                    t.copy_(s).add_(v, alpha=sign * e)
            _set_rng_states(local[0].device, rng)
            _backward_mean_loss(model, batches, autocast, loss_scale, grad_sync)
            grads = [None if p.grad is None else _local(p.grad) for p in params]
            for p in params:
                p.grad = None
            # Both passes run the same graph, so a parameter has a gradient in both or neither.
            differences = grads if sign > 0 else [None if a is None else a.sub_(b) for a, b in zip(differences, grads)]
    finally:
        with torch.no_grad():
            torch._foreach_copy_(local, saved)
        for p in params:
            p.grad = None
    return [None if d is None else d.div_(2.0 * e * loss_scale) for d, e in zip(differences, steps)]


def _shared_normal(p: Tensor, generator: torch.Generator) -> Tensor:
    """N(0, I) of p's full shape from `generator`, then this rank's shard of it if p is a
    DTensor: the same draw on every rank, sliced without communication."""
    u = torch.randn(p.shape, generator=generator, device=generator.device, dtype=p.dtype).to(_local(p).device)
    if isinstance(p, DTensor):
        u = distribute_tensor(u, p.device_mesh, p.placements, src_data_rank=None).to_local()
    return u


def _rng_states(device: torch.device) -> list[Tensor]:
    states = [torch.get_rng_state()]
    if device.type != "cpu":
        states.append(torch.get_device_module(device.type).get_rng_state(device))
    return states


def _set_rng_states(device: torch.device, states: list[Tensor]) -> None:
    torch.set_rng_state(states[0])
    if device.type != "cpu":
        torch.get_device_module(device.type).set_rng_state(states[1], device)


def _backward_mean_loss(model: Callable, batches: list[tuple[Tensor, Tensor]],
                        autocast: contextlib.AbstractContextManager | None, loss_scale: float,
                        grad_sync: Callable[[bool], None] | None) -> None:
    """.grad <- loss_scale x the gradient of the token mean of the loss over all `batches`."""
    tokens = sum(y.numel() for _, y in batches)
    for i, (x, y) in enumerate(batches):
        if grad_sync is not None:
            grad_sync(i == len(batches) - 1)
        with autocast or contextlib.nullcontext():
            _, loss = model(x, y)
        (loss * (loss_scale * y.numel() / tokens)).backward()
