"""Peak memory of the GNB estimate's logits-side work (label sampling, the sampled-label
cross-entropy and its gradient) on GPT-2-small shapes, on the CPU.

    python -m scripts.bench_gnb_memory                 # 12 x 1024 tokens, vocabulary 50304, bfloat16 logits

The model is a stand-in that returns one estimator chunk's logits (batch x block x vocab, in
the dtype a bf16 autocast run produces) as a leaf tensor, so the measurement holds the
estimator's own temporaries and the gradient that reaches the logits (which any backward
through the model produces), and nothing of a transformer. Reported: the peak resident
memory above what was held before the call (Linux VmHWM, reset just before it), in MiB and
in units of one float32 copy of the logits.
"""

import argparse
from pathlib import Path

import torch

from sophia import gnb_hessian


class StandIn(torch.nn.Module):
    """Returns the same logits, a leaf that receives their gradient, whatever the input."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.logits = logits.requires_grad_()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return self.logits, None


def rss_mib(key: str) -> float:
    line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith(key + ":"))
    return int(line.split()[1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=12)
    parser.add_argument("--block", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=50304)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    logits = torch.randn(args.batch, args.block, args.vocab, generator=torch.Generator().manual_seed(0)).to(dtype)
    model = StandIn(logits)
    x = torch.zeros(args.batch, args.block, dtype=torch.long)
    before = rss_mib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    gnb_hessian(model, [], [x], torch.Generator().manual_seed(1))  # no h_hat: the logits are no parameter
    extra = rss_mib("VmHWM") - before
    fp32_copy = args.batch * args.block * args.vocab * 4 / 2 ** 20
    print(f"GNB estimate, logits {args.batch} x {args.block} x {args.vocab} {args.dtype}: peak {extra:,.0f} MiB above "
          f"the logits = {extra / fp32_copy:.2f} float32 copies of them ({fp32_copy:,.0f} MiB each)")


if __name__ == "__main__":
    main()
