"""The baselines beside Sophia, made to skip a step on the device: Lion (lion_pytorch), Muon
(torch.optim.Muon for the hidden matrices, AdamW for the rest) and SOAP (pytorch-optimizer).

train.py skips a step whose loss or gradient is not finite without waiting for the device:
it sets `optimizer.found_inf` (a 0-dim tensor, nonzero to skip) and calls step(), the
protocol of torch's fused AdamW. These wrappers read the flag; each built optimizer's
`reads_found_inf` says whether it can. optimizers.py builds them and imports this module
only for these optimizers (lion_pytorch is needed for Lion only).
"""

import torch
from lion_pytorch import Lion
from lion_pytorch.lion_pytorch import update_fn as lion_update
from torch.optim._muon import muon as muon_update  # torch's functional Muon update (no public alias)


def skip_flag(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """The optimizer's found_inf as a boolean tensor, or None when the loop set none."""
    flag = getattr(optimizer, "found_inf", None)
    return flag != 0 if isinstance(flag, torch.Tensor) else None


def keep_unless_skipped(skip: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Each (tensor, its updated copy): take the copy, unless the step is skipped. A select on
    the device, never a branch on the host."""
    for old, new in pairs:
        old.copy_(torch.where(skip, old, new))


class SkippableLion(Lion):
    """lion_pytorch's Lion, whose update leaves p and m as they were where `found_inf` is set
    (the protocol of torch's fused AdamW and of Sophia): a skipped step needs no host sync.
    The update is lion_pytorch's own, run on copies, so an applied step is bitwise Lion's."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.update_fn = self._update
        self.reads_found_inf = True

    def _update(self, p, grad, exp_avg, lr, wd, beta1, beta2) -> None:
        skip = skip_flag(self)
        if skip is None:  # no flag: Lion's own in-place update, no copies
            lion_update(p, grad, exp_avg, lr, wd, beta1, beta2)
            return
        new_p, new_m = p.detach().clone(), exp_avg.clone()
        lion_update(new_p, grad, new_m, lr, wd, beta1, beta2)
        keep_unless_skipped(skip, [(p, new_p), (exp_avg, new_m)])


class MuonAdamW(torch.optim.Optimizer):
    """Muon for the transformer blocks' 2-D matrices (torch.optim.Muon's update), AdamW for
    the rest (embeddings and the tied head, LayerNorm gains, biases; torch's docs say Muon is
    for hidden matrices only), as one optimizer: one state_dict, one list of param groups
    (the loop sets every group's lr), one found_inf. Muon's LR is adjusted with
    "match_rms_adamw" (Moonshot: 0.2 sqrt(max(A, B)) x lr), so one peak LR and one decoupled
    weight decay drive both parts. It reads found_inf only with fused=True: torch's non-fused
    AdamW refuses the flag, so where torch has no fused AdamW the loop skips on the host."""

    def __init__(self, hidden: list[torch.Tensor], groups: list[dict], lr: float, weight_decay: float,
                 betas: tuple[float, float], momentum: float, fused: bool):
        """`hidden`: the matrices for Muon; `groups`: every parameter's param groups (the hidden
        matrices are taken out of them for AdamW)."""
        ids = {id(p) for p in hidden}
        rest = [{**g, "params": [p for p in g["params"] if id(p) not in ids]} for g in groups]
        self.muon = SkippableMuon(hidden, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                  adjust_lr_fn="match_rms_adamw")
        self.adamw = torch.optim.AdamW(rest, lr=lr, betas=betas, fused=fused)
        super().__init__([*self.muon.param_groups, *self.adamw.param_groups], {})
        self._share()
        self.reads_found_inf = fused

    def _share(self) -> None:
        """The parts use this optimizer's group dicts and state (load_state_dict replaces both)."""
        n = len(self.muon.param_groups)
        self.muon.param_groups, self.adamw.param_groups = self.param_groups[:n], self.param_groups[n:]
        self.muon.state = self.adamw.state = self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._share()

    @torch.no_grad()
    def step(self, closure=None):
        for part in (self.muon, self.adamw):
            if skip_flag(self) is not None:
                part.found_inf = self.found_inf
            part.step()


class SkippableMuon(torch.optim.Muon):
    """torch.optim.Muon whose update leaves p and its momentum as they were where `found_inf`
    is set, as SkippableLion does: torch's own update, run tensor by tensor on copies."""

    @torch.no_grad()
    def step(self, closure=None):
        skip = skip_flag(self)
        if skip is None:  # no flag: torch's own step, no copies
            return super().step(closure)
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            self._init_group(group, params, grads, bufs)
            options = {k: group[k] for k in ("lr", "weight_decay", "momentum", "nesterov", "ns_coefficients", "eps",
                                             "ns_steps", "adjust_lr_fn")}
            for p, grad, buf in zip(params, grads, bufs):
                new_p, new_buf = p.detach().clone(), buf.clone()
                muon_update([new_p], [grad], [new_buf], has_complex=False, **options)
                keep_unless_skipped(skip, [(p, new_p), (buf, new_buf)])


def _copy(value):
    """A copy of an optimizer state value: tensors cloned, lists (SOAP's per-dimension GG and Q) copied."""
    if isinstance(value, torch.Tensor):
        return value.clone()
    return [_copy(v) for v in value] if isinstance(value, list) else value


def _select(skip: torch.Tensor, old, new):
    """`old` where the step is skipped, else `new`, through lists; plain values are the new ones."""
    if isinstance(new, torch.Tensor):
        return torch.where(skip, old, new)
    return [_select(skip, o, n) for o, n in zip(old, new)] if isinstance(new, list) else new


class SkippableSOAP(torch.optim.Optimizer):
    """pytorch-optimizer's SOAP (Vyas et al. 2024: Adam in the eigenbasis of Shampoo's
    preconditioner, refreshed every `precondition_frequency` steps; decoupled weight decay),
    whose step leaves p, its moments and its preconditioner (GG, Q) as they were where
    `found_inf` is set. The package's step runs on the live tensors after they are copied, and
    a select puts the copies back where the step is skipped: an applied step is bitwise the
    package's. The package counts steps in a host integer (param_groups' "step": the bias
    correction and the refresh schedule), which a skip decided on the device cannot hold back:
    it counts calls of step(), skipped ones included. A skip on the very first step leaves what
    the package initialises from a zero gradient (zero moments and statistics, a fixed basis)
    instead of no state. As MuonAdamW does with its parts, the package's optimizer uses this
    one's param groups and state."""

    def __init__(self, groups: list[dict], **kwargs):
        from pytorch_optimizer import SOAP  # imported when used: it takes seconds (it imports transformers)
        self.soap = SOAP(groups, **kwargs)
        super().__init__(self.soap.param_groups, self.soap.defaults)
        self._share()
        self.reads_found_inf = True

    def _share(self) -> None:
        self.soap.param_groups, self.soap.state = self.param_groups, self.state

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        self._share()

    @torch.no_grad()
    def step(self, closure=None):
        skip = skip_flag(self)
        if skip is None:  # no flag: the package's step, no copies
            return self.soap.step(closure)
        params = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        saved = {p: (p.detach().clone(), {k: _copy(v) for k, v in self.state[p].items()}) for p in params}
        for p in params:  # a non-finite gradient would reach the eigendecomposition
            p.grad.masked_fill_(skip, 0.0)
        self.soap.step()
        for p, (old_p, old_state) in saved.items():
            p.copy_(torch.where(skip, old_p, p))
            for key, old in old_state.items():
                self.state[p][key] = _select(skip, old, self.state[p][key])
