"""How close the finite-difference Hessian-vector product (sophia.fd_hessian_vector_product)
comes to the exact one (sophia.hessian_vector_product), over a sweep of its step eps: the table
the default step (sophia.FD_EPSILON) was chosen from.

    python -m scripts.bench_hvp                                # both models, 10 refreshes (tens of minutes on 2 CPU cores)
    python -m scripts.bench_hvp --models quick --refreshes 3   # a quick look

Models: "quick", the quick start's (config/train_shakespeare_char.py: 4 layers x 128, block 64),
first trained --train_steps AdamW steps on shakespeare_char so its Hessian is that of a model
in training, estimated on 6 sequences (the quick start's hess_batch_size); "gpt2", GPT-2-small
shapes (12 layers x 768, vocabulary 50304) with a short block (64) at initialisation, on 2
sequences of the same data. Per refresh, u ~ N(0, I) is drawn and H u computed exactly in
float32 (the truth) and by finite differences in float32 and under bfloat16 autocast, for
every step in the sweep: "abs" eps is the step itself, "rel" eps times each tensor's RMS
(the product is then H D u / rms_i with D the diagonal of the RMSs, compared with its own exact
value). Methods: "central" (g(+eps) - g(-eps)) / 2 eps, 2 passes; "forward" (g(+eps) - g(0)) /
eps, 2 passes; "richardson" (4 C(eps) - C(2 eps)) / 3 from two central differences, 4 passes.

Reported per row: the relative error |Hu - Hu_exact| / |Hu_exact| and the cosine similarity,
averaged over the refreshes, and the same for h = the EMA (beta2 0.99, from 0) of u * Hu after
all refreshes, what Sophia-H pre-conditions with; "h vs u·Hu" is that h's relative error
against Hutchinson's own estimate (exact, float32, the same u), which for "rel" steps also
holds the change of estimator. The exact bf16 row is the exact product under autocast (what
bfloat16 alone costs); the exact "rel" row is the rel estimator without finite differences.
"""

import argparse
import contextlib
import functools
import platform
import time
from pathlib import Path

import torch

from dataset import Batches, prepare_dataset, read_split
from model import GPT, GPTConfig
from paths import ROOT
from sophia import fd_hessian_vector_product, hessian_vector_product
from tokenizer import read_meta

MODELS = {
    "quick": dict(config=dict(n_layer=4, n_head=4, n_embd=128, block_size=64, bias=False),
                  sequences=6),
    "gpt2": dict(config=dict(n_layer=12, n_head=12, n_embd=768, block_size=64, vocab_size=50304, bias=False),
                 sequences=2),
}
BETA2 = 0.99


def trained_model(name: str, train_steps: int, seed: int) -> tuple[GPT, list[tuple[torch.Tensor, torch.Tensor]]]:
    """The model after `train_steps` AdamW steps on shakespeare_char, and the estimator's batch."""
    data_dir = ROOT / "data" / "shakespeare_char"
    prepare_dataset(data_dir)
    torch.manual_seed(seed)
    spec = MODELS[name]
    model = GPT(GPTConfig(**{"vocab_size": read_meta(data_dir)["vocab_size"], **spec["config"]}))
    batches = Batches(read_split(data_dir, "train"), model.config.block_size, 12, seed, "cpu")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(train_steps):
        (x, y), = batches.next()
        model(x, y)[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    x, y = batches.next()[0]
    return model, [(x[:spec["sequences"]], y[:spec["sequences"]])]


def gradient(model: GPT, params: list[torch.Tensor], batch, shift: list[torch.Tensor] | None, autocast) -> list:
    """The gradient at theta + shift (theta restored from a copy afterwards)."""
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, s in zip(params, shift or []):
            p.add_(s)
    with autocast:
        model(*batch[0])[1].backward()
    grads = [p.grad for p in params]
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
            p.grad = None
    return grads


def fd_product(method: str, model: GPT, params, batch, u, steps, autocast) -> list[torch.Tensor]:
    if method == "central":
        return fd_hessian_vector_product(model, params, batch, u, steps, autocast)
    if method == "richardson":
        near = fd_hessian_vector_product(model, params, batch, u, steps, autocast)
        far = fd_hessian_vector_product(model, params, batch, u, [2 * e for e in steps], autocast)
        return [(4 * a - b) / 3 for a, b in zip(near, far)]
    plus = gradient(model, params, batch, [e * v for e, v in zip(steps, u)], autocast)
    zero = gradient(model, params, batch, None, autocast)
    return [(a - b) / e for a, b, e in zip(plus, zero, steps)]


def flat(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.float().reshape(-1) for t in tensors])


def ema(h: torch.Tensor | None, estimate: torch.Tensor) -> torch.Tensor:
    """Sophia's EMA of the estimates, from h = 0."""
    return (1 - BETA2) * estimate if h is None else h.mul_(BETA2).add_(estimate, alpha=1 - BETA2)


def compare(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(relative error, cosine similarity), the sums in float64."""
    norm = functools.partial(torch.linalg.vector_norm, dtype=torch.float64)
    dot = torch.dot(got.double(), want.double())
    return (norm(got - want) / norm(want)).item(), (dot / (norm(got) * norm(want))).item()


def sweep(name: str, args) -> list[dict]:
    model, batch = trained_model(name, args.train_steps if name == "quick" else 0, args.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    rms = [p.detach().pow(2).mean().sqrt().item() for p in params]
    f32, bf16 = contextlib.nullcontext(), torch.autocast("cpu", dtype=torch.bfloat16)
    rows = {}  # (method, dtype, mode, eps) -> the Hu comparisons and the EMA of u * Hu
    h_exact = {}  # mode -> the EMA of u * (exact Hu)
    generator = torch.Generator().manual_seed(args.seed + 1)
    started = time.perf_counter()
    for refresh in range(args.refreshes):
        u = [torch.randn(p.shape, generator=generator) for p in params]
        exact = {"abs": hessian_vector_product(model, params, batch, u)}
        cases = [("exact", "bf16", "abs", None, lambda: hessian_vector_product(model, params, batch, u, bf16))]
        if args.rel:
            scaled = hessian_vector_product(model, params, batch, [r * v for r, v in zip(rms, u)])
            exact["rel"] = [hv / r for hv, r in zip(scaled, rms)]
            cases.append(("exact", "fp32", "rel", None, lambda: exact["rel"]))
        for mode, product in exact.items():
            h_exact[mode] = ema(h_exact.get(mode), flat(u) * flat(product))
        for method in args.methods:
            for dtype, autocast in (("fp32", f32), ("bf16", bf16)):
                if dtype not in args.autocast:
                    continue
                for mode, grid in (("abs", args.abs), ("rel", args.rel)):
                    for eps in grid:
                        steps = [eps] * len(params) if mode == "abs" else [eps * r for r in rms]
                        cases.append((method, dtype, mode, eps, lambda m=method, s=steps, a=autocast:
                                      fd_product(m, model, params, batch, u, s, a)))
        for method, dtype, mode, eps, product in cases:
            hu = product()
            row = rows.setdefault((method, dtype, mode, eps), {"hu": [], "h": None})
            row["hu"].append(compare(flat(hu), flat(exact[mode])))
            row["h"] = ema(row["h"], flat(u) * flat(hu))
            del hu
        print(f"{name}: refresh {refresh + 1}/{args.refreshes} done after {time.perf_counter() - started:.0f} s",
              flush=True)
    table = []
    for (method, dtype, mode, eps), row in rows.items():
        n = len(row["hu"])
        table.append(dict(model=name, method=method, dtype=dtype, mode=mode, eps=eps,
                          hu_err=sum(e for e, _ in row["hu"]) / n, hu_cos=sum(c for _, c in row["hu"]) / n,
                          h=compare(row["h"], h_exact[mode]), h_abs=compare(row["h"], h_exact["abs"])))
    return table


def markdown(table: list[dict]) -> str:
    lines = ["| model | method | autocast | eps | Hu rel. error | Hu cosine | h rel. error | h cosine | h vs u·Hu |",
             "|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in table:
        eps = "—" if r["eps"] is None else f"{r['eps']:g}" + (" × RMS" if r["mode"] == "rel" else "")
        lines.append(f"| {r['model']} | {r['method']} | {r['dtype']} | {eps} | {r['hu_err']:.2e} | {r['hu_cos']:.6f} "
                     f"| {r['h'][0]:.2e} | {r['h'][1]:.6f} | {r['h_abs'][0]:.2e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", default="quick,gpt2", help="comma-separated: " + ", ".join(MODELS))
    parser.add_argument("--methods", default="central,forward,richardson",
                        help="comma-separated: central, forward, richardson")
    parser.add_argument("--abs", default="1e-2,3e-3,1e-3,3e-4,1e-4,1e-5", help="absolute steps")
    parser.add_argument("--rel", default="3e-1,1e-1,3e-2,1e-2,1e-3,1e-4", help="steps relative to each tensor's RMS")
    parser.add_argument("--autocast", default="fp32,bf16", help="comma-separated: fp32 (none), bf16")
    parser.add_argument("--refreshes", type=int, default=10)
    parser.add_argument("--train_steps", type=int, default=300, help="AdamW steps before measuring (quick model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, help="also write the Markdown table here")
    args = parser.parse_args()
    args.methods, args.autocast = args.methods.split(","), args.autocast.split(",")
    args.abs, args.rel = ([float(v) for v in s.split(",") if v] for s in (args.abs, args.rel))
    torch.set_num_threads(args.threads)
    table = [row for name in args.models.split(",") for row in sweep(name, args)]
    text = (f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
            f"{args.refreshes} refreshes\n\n{markdown(table)}\n")
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
