"""Sophia: Second-order Clipped Stochastic Optimization (Liu et al., 2023).

Two parts, kept apart so the training loop stays one loop:
  * the optimizer (`SophiaG`, `SophiaH`): every step
        m <- beta1 m + (1 - beta1) g
        theta <- theta - lr wd theta
        theta <- theta - lr clip(m / max(rho h, eps), -1, 1)
    and `update_hessian(h_hat)`, which folds one estimate into h <- beta2 h + (1 - beta2) h_hat;
  * the estimators (`gnb_hessian`, `hutchinson_hessian`), functions of the model and a
    batch that return h_hat for every parameter; the loop calls one every k steps.

Two options exist only for the paper's ablations (Fig. 7b, 7c): clip=False drops the clip
(theta <- theta - lr m / max(rho h, eps)), and sqrt_hessian=True divides by rho sqrt(h),
with h an EMA of squared estimates (the AdaHessian-style pre-conditioner).

Where h <= 0 the ratio m / eps is huge, so the clip turns the update into lr sign(m): the
paper's fallback to sign momentum, never a step uphill (the reference implementation's
|m| / (rho h) reverses the sign of m when h < 0).

The update has three implementations that compute the same thing:
  "reference"  a per-tensor loop that reads like the formula; the tests hold the others to it;
  "foreach"    torch._foreach_* kernels over all tensors of a group at once;
  "compiled"   the foreach version through torch.compile, fused into a few kernels (lr lives
               in a tensor so a changing schedule does not recompile).
"""

import contextlib
import math
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.distributed.tensor import DTensor

from model import math_attention

IMPLEMENTATIONS = ("reference", "foreach", "compiled")


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2): Sophia's update is elementwise, so each rank
    updates its own shard; plain tensors pass through."""
    return t.to_local() if isinstance(t, DTensor) else t


class Sophia(torch.optim.Optimizer):
    """Sophia's update rule; the Hessian estimate comes from outside via update_hessian().

    Args:
        params: parameters or param groups, as for any torch optimizer.
        lr: peak learning rate; the largest step any coordinate can take.
        betas: (beta1, beta2): EMA rates of the gradient and of the Hessian estimates.
        rho: the paper's gamma; scales h in the denominator and so sets how many
            coordinates are clipped (tune it so 10-50% are not).
        weight_decay: decoupled, applied as theta <- theta (1 - lr wd).
        eps: floor of the denominator; also what makes h <= 0 fall back to sign(m).
        maximize: ascend instead of descend.
        impl: "reference", "foreach", "compiled", or "auto" (compiled on CUDA, else foreach).
        stats_every: count the unclipped coordinates (stats()["win_rate"]) on every
            stats_every-th step only, e.g. the logging interval: the count is one more read
            of m and h per step, about a quarter of the compiled update's memory traffic.
            win_rate is then the fraction over the counted steps.
        clip: ablation only; False updates by lr m / max(rho h, eps) unclipped.
        sqrt_hessian: ablation only; True divides by max(rho sqrt(h), eps): feed it squared
            estimates for an AdaHessian-style pre-conditioner.
    """

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.04, weight_decay: float = 1e-1, eps: float = 1e-12,
                 maximize: bool = False, impl: str = "auto", stats_every: int = 1, *,
                 clip: bool = True, sqrt_hessian: bool = False):
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
        if not (isinstance(stats_every, int) and stats_every >= 1):
            raise ValueError(f"invalid stats_every={stats_every!r}: must be an integer >= 1")
        if impl not in IMPLEMENTATIONS + ("auto",):
            raise ValueError(f"invalid impl={impl!r}: choose one of {IMPLEMENTATIONS + ('auto',)}")
        defaults = dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay, eps=eps,
                        maximize=maximize, clip=clip, sqrt_hessian=sqrt_hessian)
        super().__init__(params, defaults)
        self.impl = impl
        self.stats_every = stats_every
        # Statistics accumulate on the device and are read (one sync) by stats().
        self._stat_unclipped: Tensor | None = None
        self._stat_coords = 0
        self._stat_skipped_estimates: Tensor | None = None
        self._lr_tensors: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def _state(self, p: Tensor) -> dict:
        state = self.state[p]
        if len(state) == 0:
            state["step"] = torch.zeros((), dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _resolve_impl(self, device: torch.device, any_dtensor: bool) -> str:
        if self.impl != "auto":
            impl = self.impl
        else:
            impl = "compiled" if device.type == "cuda" else "foreach"
        if impl == "compiled" and any_dtensor:
            return "foreach"  # inductor does not trace DTensor shards through our list op
        return impl

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
        weights = [1.0 - group["betas"][1] for group, _, _ in pairs]
        if self._resolve_impl(hessians[0].device, bool(sharded)) == "compiled":
            global _compiled_fold
            if _compiled_fold is None:
                _compiled_fold = torch.compile(_fold_hessian, fullgraph=True, dynamic=False)
            _compiled_fold(hessians, estimates, finite, weights)
            return
        # Blend in place; where the estimate is not finite, weight 0 (and no NaN * 0).
        for h, e, w in zip(hessians, estimates, weights):
            h.lerp_(torch.nan_to_num(e, nan=0.0, posinf=0.0, neginf=0.0), torch.where(finite, w, 0.0).to(h.dtype))

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, exp_avgs, hessians, steps = [], [], [], [], []
            any_dtensor = False
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Sophia does not support sparse gradients")
                state = self._state(p)
                any_dtensor |= isinstance(p, DTensor)
                params.append(_local(p))
                grads.append(_local(p.grad))
                exp_avgs.append(_local(state["exp_avg"]))
                hessians.append(_local(state["hessian"]))
                steps.append(state["step"])
            if not params:
                continue
            torch._foreach_add_(steps, 1.0)
            # The step counters are CPU tensors (restored with the state): no device sync.
            count = self.stats_every == 1 or int(steps[0].item()) % self.stats_every == 0
            beta1, _ = group["betas"]
            impl = self._resolve_impl(params[0].device, any_dtensor)
            args = (params, grads, exp_avgs, hessians)
            kwargs = dict(beta1=beta1, rho=group["rho"], weight_decay=group["weight_decay"],
                          eps=group["eps"], maximize=group["maximize"], count=count,
                          clip=group.get("clip", True), sqrt_hessian=group.get("sqrt_hessian", False))
            if impl == "reference":
                unclipped = _update_reference(*args, lr=group["lr"], **kwargs)
            elif impl == "foreach":
                unclipped = _update_foreach(*args, lr=group["lr"], **kwargs)
            else:
                # lr in float64 for float64 parameters: in float32, 1 - lr wd loses ~1e-8.
                lr_dtype = torch.promote_types(params[0].dtype, torch.float32)
                unclipped = _update_compiled(*args, lr=self._lr_tensor(group["lr"], params[0].device, lr_dtype),
                                             **kwargs)
            if not count:
                continue
            if self._stat_unclipped is None:
                self._stat_unclipped = torch.zeros((), device=params[0].device, dtype=torch.float64)
            self._stat_unclipped += unclipped
            self._stat_coords += sum(p.numel() for p in params)
        return loss

    def _lr_tensor(self, lr: float, device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
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
        unclipped = self._stat_unclipped if self._stat_unclipped is not None else torch.zeros((), device=device)
        skipped = (self._stat_skipped_estimates if self._stat_skipped_estimates is not None
                   else torch.zeros((), device=device))
        values = torch.stack([unclipped.double().to(device), sq.double(),
                              torch.tensor(float(self._stat_coords), dtype=torch.float64, device=device),
                              skipped.double().to(device)])
        if sharded and dist.is_initialized():
            dist.all_reduce(values[:3])
        unclipped_v, sq_v, coords_v, skipped_v = values.tolist()
        if reset:
            self._stat_unclipped = None
            self._stat_coords = 0
            self._stat_skipped_estimates = None
        return dict(win_rate=unclipped_v / coords_v if coords_v else float("nan"),
                    hessian_norm=math.sqrt(sq_v), skipped_estimates=skipped_v)


class SophiaG(Sophia):
    """Sophia with the Gauss-Newton-Bartlett estimator (pair it with `gnb_hessian`).
    Paper defaults: betas (0.965, 0.99), rho 0.05, weight decay 0.2."""

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.05, weight_decay: float = 0.2, eps: float = 1e-12,
                 maximize: bool = False, impl: str = "auto", stats_every: int = 1, **ablations):
        super().__init__(params, lr, betas, rho, weight_decay, eps, maximize, impl, stats_every, **ablations)


class SophiaH(Sophia):
    """Sophia with Hutchinson's estimator (pair it with `hutchinson_hessian`).
    Paper defaults: betas (0.965, 0.99), rho 0.01, weight decay 0.2."""

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.01, weight_decay: float = 0.2, eps: float = 1e-12,
                 maximize: bool = False, impl: str = "auto", stats_every: int = 1, **ablations):
        super().__init__(params, lr, betas, rho, weight_decay, eps, maximize, impl, stats_every, **ablations)


# ----------------------------------------------------------------------------- update rules
# Each returns the number of coordinates whose update was not clipped, as a 0-dim tensor
# (with count=False the count is skipped and the value is meaningless).

def _denominator(h: Tensor, rho: float, eps: float, sqrt_hessian: bool) -> Tensor:
    """max(rho h, eps), or max(rho sqrt(h), eps) for the AdaHessian-style ablation."""
    return torch.clamp(rho * (h.sqrt() if sqrt_hessian else h), min=eps)


def _update_reference(params, grads, exp_avgs, hessians, *, lr, beta1, rho, weight_decay, eps,
                      maximize, count=True, clip=True, sqrt_hessian=False) -> Tensor:
    unclipped = torch.zeros((), dtype=torch.float64, device=params[0].device)
    for p, g, m, h in zip(params, grads, exp_avgs, hessians):
        g = -g if maximize else g
        m.lerp_(g, 1.0 - beta1)
        p.mul_(1.0 - lr * weight_decay)
        ratio = m / _denominator(h, rho, eps, sqrt_hessian)
        if count:
            unclipped += (ratio.abs() < 1).sum()
        p.add_(ratio.clamp(-1.0, 1.0) if clip else ratio, alpha=-lr)
    return unclipped


# Elements per group of the foreach update: its temporaries are one group's worth, small
# enough on the CPU to be reused from the heap (no page faults) and to stay in cache.
_FOREACH_GROUP = {"cpu": 1 << 22}
_FOREACH_GROUP_DEFAULT = 1 << 24  # <= 2^24 also keeps the float32 counts exact


def _groups(tensor_lists: list[list[Tensor]], limit: int):
    """The aligned tensor lists cut into groups of <= `limit` elements: a larger tensor is cut
    into flat views (unless it is not contiguous: then it goes whole). Yields (lists, size)."""
    group, size = [[] for _ in tensor_lists], 0
    for tensors in zip(*tensor_lists):
        n = tensors[0].numel()
        whole = n <= limit or not all(t.is_contiguous() for t in tensors)
        for start in [None] if whole else range(0, n, limit):
            length = n if whole else min(limit, n - start)
            if size and size + length > limit:
                yield group, size
                group, size = [[] for _ in tensor_lists], 0
            for views, t in zip(group, tensors):
                views.append(t if whole else t.view(-1)[start:start + length])
            size += length
    if size:
        yield group, size


def _update_foreach(params, grads, exp_avgs, hessians, *, lr, beta1, rho, weight_decay, eps,
                    maximize, count=True, clip=True, sqrt_hessian=False) -> Tensor | None:
    clipped = []
    limit = _FOREACH_GROUP.get(params[0].device.type, _FOREACH_GROUP_DEFAULT)
    for (p, g, m, h), size in _groups([params, grads, exp_avgs, hessians], limit):
        if maximize:
            g = torch._foreach_neg(g)
        torch._foreach_lerp_(m, g, 1.0 - beta1)
        if weight_decay != 0.0:
            torch._foreach_mul_(p, 1.0 - lr * weight_decay)
        # One temporary list, reused in place: max(rho h, eps), then m / it, then the clip.
        if sqrt_hessian:
            ratio = torch._foreach_sqrt(h)
            torch._foreach_mul_(ratio, rho)
        else:
            ratio = torch._foreach_mul(h, rho)
        torch._foreach_clamp_min_(ratio, eps)
        for m_i, r in zip(m, ratio):
            torch.div(m_i, r, out=r)
        if clip:
            torch._foreach_clamp_min_(ratio, -1.0)
            torch._foreach_clamp_max_(ratio, 1.0)
        torch._foreach_add_(p, ratio, alpha=-lr)
        if not count:
            continue
        # Count in place: floor(|clipped ratio|) is 1 where the ratio was clipped, 0 where
        # |ratio| < 1; NaN counts as clipped, as in the reference. Sums of <= 2^24 ones are exact.
        torch._foreach_abs_(ratio)
        if not clip:
            torch._foreach_clamp_max_(ratio, 1.0)
        torch._foreach_floor_(ratio)
        for r in ratio:
            r.nan_to_num_(nan=1.0)
        wide = size > 1 << 24 or any(r.dtype == torch.float64 for r in ratio)
        clipped += torch._foreach_norm(ratio, 1, dtype=torch.float64 if wide else torch.float32)
    if not count:
        return None
    total = (torch.stack(clipped).double().sum() if clipped
             else torch.zeros((), dtype=torch.float64, device=params[0].device))
    return sum(p.numel() for p in params) - total


def _update_fused(params, grads, exp_avgs, hessians, lr: Tensor, beta1: float, rho: float,
                  weight_decay: float, eps: float, maximize: bool, clip: bool, sqrt_hessian: bool) -> None:
    """One elementwise expression per tensor, for inductor to fuse: reads p, g, m, h and
    writes p, m (24 bytes per fp32 parameter). The count of unclipped coordinates is a
    separate kernel: inductor does not fuse a reduction into a loop that stores, so counting
    here would re-read m, g and h (12 bytes) instead of the new m and h (8 bytes)."""
    for p, g, m, h in zip(params, grads, exp_avgs, hessians):
        g = -g if maximize else g
        m_new = torch.lerp(m, g, 1.0 - beta1)
        ratio = m_new / _denominator(h, rho, eps, sqrt_hessian)
        m.copy_(m_new)
        p.copy_(p * (1.0 - lr * weight_decay) - lr * (ratio.clamp(-1.0, 1.0) if clip else ratio))


def _count_unclipped(exp_avgs, hessians, rho: float, eps: float, sqrt_hessian: bool) -> Tensor:
    """Coordinates with |m / max(rho h, eps)| < 1, from the updated m."""
    return torch.stack([((m / _denominator(h, rho, eps, sqrt_hessian)).abs() < 1).sum()
                        for m, h in zip(exp_avgs, hessians)]).sum().double()


def _fold_hessian(hessians, estimates, finite: Tensor, weights: list[float]) -> None:
    """h <- lerp(h, h_hat, 1 - beta2) where the whole estimate is finite, else h: one kernel
    reading h and h_hat and writing h (the eager version also writes a NaN-free copy)."""
    for h, e, w in zip(hessians, estimates, weights):
        h.copy_(torch.where(finite, torch.lerp(h, e, w), h))


_compiled_fused = None
_compiled_count = None
_compiled_fold = None


def _update_compiled(params, grads, exp_avgs, hessians, *, lr, beta1, rho, weight_decay, eps,
                     maximize, count=True, clip=True, sqrt_hessian=False) -> Tensor | None:
    global _compiled_fused, _compiled_count
    if _compiled_fused is None:
        _compiled_fused = torch.compile(_update_fused, fullgraph=True, dynamic=False)
        _compiled_count = torch.compile(_count_unclipped, fullgraph=True, dynamic=False)
    _compiled_fused(params, grads, exp_avgs, hessians, lr, beta1, rho, weight_decay, eps, maximize, clip, sqrt_hessian)
    return _compiled_count(exp_avgs, hessians, rho, eps, sqrt_hessian) if count else None


# ----------------------------------------------------------------------------- estimators

def _average_across_ranks(tensors: list[Tensor]) -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.AVG)


def sample_labels(logits: Tensor, uniform: Tensor) -> Tensor:
    """Draw one label per row of `logits` (..., V) from softmax(logits) by inverting the
    CDF at `uniform` (...,): one softmax and one cumsum over the logits, no host sync,
    and the draw is a pure function of the uniforms (so it is reproducible across ranks
    and restarts). torch.distributions.Categorical would copy the logits and sync."""
    cdf = torch.softmax(logits.float(), dim=-1).cumsum_(dim=-1)
    # Scale by the last cdf value so rounding in the sum cannot put u past the end.
    target = (uniform.to(cdf.dtype) * cdf[..., -1]).unsqueeze(-1)
    labels = torch.searchsorted(cdf, target).squeeze(-1)
    return labels.clamp_(max=logits.size(-1) - 1)


def set_grad_sync(model: torch.nn.Module, enabled: bool) -> None:
    """Turn the gradient all-reduce of a DDP or FSDP2 module on or off, so that only the
    last of several backward passes pays for it; a plain module is left alone."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model.require_backward_grad_sync = enabled
    elif hasattr(model, "set_requires_gradient_sync"):  # FSDP2's fully_shard
        model.set_requires_gradient_sync(enabled)


def gnb_hessian(model: torch.nn.Module, params: list[Tensor], inputs: list[Tensor], generator: torch.Generator,
                rank: int = 0, world_size: int = 1, autocast=None, loss_scale: float = 1.0,
                targets: list[Tensor] | None = None) -> list[Tensor]:
    """Gauss-Newton-Bartlett estimate (paper Algorithm 2): h_hat = B g_hat * g_hat, where
    g_hat is the gradient of the mean cross-entropy against labels sampled from the
    model's own softmax over B predictions (all tokens of the estimator's batch, over all
    ranks). The gradient is not clipped.

    `model(x)` returns (logits, _); `inputs` are this rank's input chunks (B_i, T). The
    gradient goes through the ordinary backward into .grad, so a DDP or FSDP2 module
    averages it over ranks itself (and FSDP2's sharded DTensor parameters work); .grad must
    be empty on entry and is left empty. `generator` must be seeded identically on every
    rank: each rank draws the uniforms of the whole global batch and uses its own slice, so
    2 ranks compute exactly what one process computes on the same data.

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
        set_grad_sync(model, i == len(inputs) - 1)
        with autocast or contextlib.nullcontext():
            logits, _ = model(x)
        u = uniforms[offset:offset + x.numel()].view(x.shape)
        offset += x.numel()
        y = sample_labels(logits.detach(), u) if targets is None else targets[i]
        # Sum here and divide by the rank's prediction count: the mean over all local tokens.
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), y.reshape(-1),
                               reduction="sum") / local_preds
        (loss * loss_scale).backward()
    scale = global_preds / (loss_scale * loss_scale)
    h_hat = []
    for p in params:
        h_hat.append(None if p.grad is None else scale * p.grad * p.grad)
        p.grad = None
    return h_hat


def hutchinson_hessian(model: Callable, params: list[Tensor], batches: list[tuple[Tensor, Tensor]],
                       generator: torch.Generator, autocast=None,
                       loss_scale: float = 1.0) -> list[Tensor]:
    """Hutchinson estimate (paper Algorithm 1): h_hat = u * (H u), u ~ N(0, I), H the Hessian
    of the mean loss over `batches` (this rank's (x, y) chunks) and over ranks.

    One Hessian-vector product by double backward through torch.autograd.grad (not
    backward(create_graph=True), which leaks the graph into .grad), with the math attention
    kernel forced: flash attention has no double backward. Pass the uncompiled module.
    `generator` must be seeded identically on every rank so u is shared and the all-reduced
    H u is the product with the global Hessian.
    """
    u = [torch.randn(p.shape, generator=generator, device=generator.device, dtype=p.dtype).to(p.device)
         for p in params]
    hvp = [torch.zeros_like(p) for p in params]
    with math_attention():
        for x, y in batches:
            with autocast or contextlib.nullcontext():
                _, loss = model(x, y)
            loss = loss * (loss_scale / len(batches))
            grads = torch.autograd.grad(loss, params, create_graph=True)
            dot = sum((g * v).sum() for g, v in zip(grads, u))
            for acc, hv in zip(hvp, torch.autograd.grad(dot, params)):
                acc.add_(hv)
    _average_across_ranks(hvp)
    return [v * hv / loss_scale for v, hv in zip(u, hvp)]

