"""Where a run stands: Progress (what a checkpoint saves besides the weights, the optimizer state
and the RNG states) and StepWindow (the steps since the last log line, summed on the device)."""

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Progress:
    """Where the run stands: with the weights, optimizer state and RNG states, what a checkpoint saves."""
    iter_num: int = 0
    tokens: int = 0
    best_val_loss: float = float("inf")
    evaluated_iter: int = -1  # the last step evaluated and logged (not saved: a resume reads its log)


class StepWindow:
    """The steps since the last log line, summed on the device as they happen (the loop never
    waits for them) and read once, at the log line."""

    def __init__(self, device: str, grad_clip: float):
        self.device, self.grad_clip = device, grad_clip
        self.bad_in_a_row = 0  # consecutive skipped steps, carried across windows
        self.skipped_total = 0
        self._reset()

    def _reset(self) -> None:
        self.loss_sum = torch.zeros((), device=self.device)
        self.clipped = torch.zeros((), device=self.device)
        self.applied: list[torch.Tensor] = []

    def add(self, loss: torch.Tensor, norm: torch.Tensor, applied: torch.Tensor) -> None:
        """One step's results from train_step; `applied` is 1.0 or 0.0 (skipped)."""
        self.applied.append(applied)
        self.loss_sum += torch.where(applied > 0, loss, 0.0)
        if self.grad_clip > 0:
            self.clipped += (norm > self.grad_clip).float() * applied
        self.norm = norm

    def close(self, last_iter: int, distributed: bool) -> dict:
        """Read the window (the host sync) and start the next: the mean loss over the applied
        steps (None when all were skipped; averaged over ranks), the last gradient norm, the
        clipping frequency, and each skipped step as (iter, how many in a row up to it)."""
        if distributed:
            dist.all_reduce(self.loss_sum, op=dist.ReduceOp.AVG)
        flags = torch.stack(self.applied).tolist()
        applied = sum(flags)
        skipped = []
        for it, flag in enumerate(flags, last_iter - len(flags) + 1):
            self.bad_in_a_row = 0 if flag else self.bad_in_a_row + 1
            if not flag:
                skipped.append((it, self.bad_in_a_row))
        self.skipped_total += len(skipped)
        summary = dict(loss=self.loss_sum.item() / applied if applied else None, grad_norm=self.norm.item(),
                       clip_frac=self.clipped.item() / max(1, applied), steps=len(flags), skipped=skipped)
        self._reset()
        return summary
