"""The paper's Fig. 2: GD, SignGD, Adam, Newton and Sophia on a 2-D landscape with one sharp
and one flat dimension (Sec. 2.1),

    L(t1, t2) = 8 (t1 - 1)^2 (1.3 t1^2 + 2 t1 + 1) + 0.5 (t2 - 4)^2,

from (0.2, 0): minimum at (1, 4), saddle at (0, 4) (L1 has a local maximum at t1 = 0).

    python -m scripts.toy_landscape                      # writes docs/toy_landscape.png
    python -m scripts.toy_landscape --steps=50 --output=/tmp/toy.png

Every method is deterministic (full gradients) and runs through torch: GD is
torch.optim.SGD, Adam torch.optim.Adam (with its EMAs), Sophia the project's
sophia.SophiaG fed the exact diagonal Hessian every step (k = 1, beta1 = beta2 = 0, no
weight decay: the update of paper eq. (4)). With lr = rho the unclipped Sophia step is the
exact Newton step and the clip caps each coordinate's step at lr. SignGD is
theta -= lr sign(g); Newton is theta -= H^-1 g (H is diagonal: L is separable).

Step sizes (flags below): GD 0.02, under the stability limit 2 / L1''(1) = 0.029 of the
sharp dimension; SignGD and Adam 0.1 (a larger step only bounces further across the sharp
valley); Sophia 0.5, which its clip and curvature make safe in the sharp dimension.
"""

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on servers and in tests
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from sophia import SophiaG  # noqa: E402

START = (0.2, 0.0)
MINIMUM = (1.0, 4.0)
SADDLE = (0.0, 4.0)
# The paper's colors: GD brown, SignGD yellow, Adam red, Newton blue, Sophia black.
COLORS = {"GD": "tab:brown", "SignGD": "gold", "Adam": "tab:red", "Newton": "tab:blue", "Sophia": "black"}


def loss_fn(theta: torch.Tensor) -> torch.Tensor:
    t1, t2 = theta[0], theta[1]
    return 8 * (t1 - 1) ** 2 * (1.3 * t1 ** 2 + 2 * t1 + 1) + 0.5 * (t2 - 4) ** 2


def gradient(theta: torch.Tensor) -> torch.Tensor:
    return torch.autograd.grad(loss_fn(theta), theta)[0]


def hessian_diagonal(theta: torch.Tensor) -> torch.Tensor:
    return torch.autograd.functional.hessian(loss_fn, theta.detach()).diagonal()


def run_optimizer(make: Callable[[list], torch.optim.Optimizer], steps: int,
                  before_step: Callable[[torch.optim.Optimizer, torch.Tensor], None] | None = None) -> np.ndarray:
    """Trajectory of a torch optimizer built by make([theta]); before_step(opt, theta) runs
    after the gradient is in .grad (Sophia's Hessian update goes there)."""
    theta = torch.tensor(START, dtype=torch.float64, requires_grad=True)
    opt = make([theta])
    path = [theta.detach().clone()]
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(theta).backward()
        if before_step is not None:
            before_step(opt, theta)
        opt.step()
        path.append(theta.detach().clone())
    return torch.stack(path).numpy()


def run_rule(update: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], steps: int) -> np.ndarray:
    """Trajectory of theta <- theta - update(theta, gradient)."""
    theta = torch.tensor(START, dtype=torch.float64, requires_grad=True)
    path = [theta.detach().clone()]
    for _ in range(steps):
        step = update(theta, gradient(theta))
        with torch.no_grad():
            theta -= step
        path.append(theta.detach().clone())
    return torch.stack(path).numpy()


def trajectories(steps: int, gd_lr: float, sign_lr: float, sophia_lr: float) -> dict[str, np.ndarray]:
    def feed_exact_hessian(opt: SophiaG, theta: torch.Tensor) -> None:
        opt.update_hessian([hessian_diagonal(theta)])

    return {
        "GD": run_optimizer(lambda p: torch.optim.SGD(p, lr=gd_lr), steps),
        "SignGD": run_rule(lambda theta, g: sign_lr * torch.sign(g), steps),
        "Adam": run_optimizer(lambda p: torch.optim.Adam(p, lr=sign_lr, betas=(0.9, 0.999)), steps),
        "Newton": run_rule(lambda theta, g: g / hessian_diagonal(theta), steps),
        "Sophia": run_optimizer(lambda p: SophiaG(p, lr=sophia_lr, betas=(0.0, 0.0), rho=sophia_lr,
                                                  weight_decay=0.0, eps=1e-12), steps, feed_exact_hessian),
    }


def plot(paths: dict[str, np.ndarray], out: Path) -> None:
    t1, t2 = np.meshgrid(np.linspace(-0.6, 1.6, 300), np.linspace(-0.6, 5.0, 300))
    z = loss_fn(torch.from_numpy(np.stack([t1, t2]))).numpy()
    fig, ax = plt.subplots(figsize=(10, 6))
    ax.contour(t1, t2, z, levels=np.geomspace(0.1, z.max(), 22), colors="0.6", linewidths=0.5)
    for name, path in paths.items():
        final = loss_fn(torch.from_numpy(path[-1])).item()
        ax.plot(path[:, 0], path[:, 1], color=COLORS[name], marker=".", markersize=5, linewidth=1.3,
                label=f"{name}: ({path[-1, 0]:.2f}, {path[-1, 1]:.2f}), L = {final:.3g}")
    ax.plot(*START, "o", color="tab:green", markersize=8, label="start (0.2, 0)")
    ax.plot(*MINIMUM, "*", color="tab:green", markersize=14, label="minimum (1, 4)")
    ax.plot(*SADDLE, "x", color="tab:purple", markersize=10, mew=2, label="saddle (0, 4)")
    ax.set(xlabel="θ[1] (sharp)", ylabel="θ[2] (flat)", xlim=(-0.6, 1.6), ylim=(-0.6, 5.0),
           title=f"L = 8(θ1-1)²(1.3θ1²+2θ1+1) + ½(θ2-4)², {len(next(iter(paths.values()))) - 1} steps")
    ax.legend(fontsize=9, loc="center left", bbox_to_anchor=(1.02, 0.5))  # off the paths
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, tuple[float, float, float]]:
    """Run every method, write the figure, print and return each final (t1, t2, loss)."""
    p = argparse.ArgumentParser(prog=f"python -m {__spec__.name}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output", default=str(Path(__file__).resolve().parents[1] / "docs" / "toy_landscape.png"))
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--gd_lr", type=float, default=0.02)
    p.add_argument("--sign_lr", type=float, default=0.1, help="SignGD's and Adam's learning rate")
    p.add_argument("--sophia_lr", type=float, default=0.5, help="Sophia's lr (= rho: the largest step per coordinate)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    paths = trajectories(args.steps, args.gd_lr, args.sign_lr, args.sophia_lr)
    plot(paths, Path(args.output))
    finals = {}
    for name, path in paths.items():
        finals[name] = (float(path[-1, 0]), float(path[-1, 1]), loss_fn(torch.from_numpy(path[-1])).item())
        print(f"{name:7s} final point ({finals[name][0]:+.4f}, {finals[name][1]:+.4f}), loss {finals[name][2]:.4g}")
    print(f"wrote {args.output}")
    return finals


if __name__ == "__main__":
    main()
