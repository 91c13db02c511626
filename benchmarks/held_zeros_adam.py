"""What torch's Adam step costs once the second moment of held zeros has underflowed.

A target with ``regrow=False`` sets the gradient and the first moment of its zero weights to zero
before each step (Note [Zeros that do not regrow] in paramreg/optim/targets.py), so their second
moment decays by β₂ a step: below the smallest normal float after about
ln(v/1.2e-38)/ln(1/β₂) steps, then denormal, then exactly zero. This times one ``torch.optim.AdamW``
step (no paramreg: the optimizer alone, each implementation) on N weights, a fraction of them held
zeros (weight, gradient and first moment zero), with their second moment normal (1e-30), at the
least that paramreg's pass lets it fall to (tiny·2^6: Note [Decaying state of held zeros] in
paramreg/optim/hooks.py), denormal (1e-40) or zero, against the same step with no held zero:
medians of interleaved rounds.

    python benchmarks/held_zeros_adam.py                  # 12.5M weights, 90% held zeros
    python benchmarks/held_zeros_adam.py --tiny           # a smoke test of seconds
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from paramreg.optim.hooks import FLOOR_BITS

LEAST = torch.finfo(torch.float32).tiny * 2.0 ** (FLOOR_BITS / 2)
CASES = {"no held zeros": None, "normal (1e-30)": 1e-30, f"paramreg's least ({LEAST:.1e})": LEAST,
         "denormal (1e-40)": 1e-40, "zero": 0.0}
IMPLEMENTATIONS = {"for-loop": {"foreach": False}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def build(n: int, held: float, second_moment: float | None, options: dict, seed: int = 0):
    """An AdamW over one tensor of n weights after one step, and the gradient and second moment
    each timed step starts from (the held zeros' entries set as described above)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.nn.Parameter(torch.randn(n, generator=g))
    grad = torch.randn(n, generator=g) * 1e-4
    opt = torch.optim.AdamW([p], lr=1e-3, **options)
    p.grad = grad.clone()
    opt.step()
    v = torch.rand(n, generator=g) * 1e-8 + 1e-10
    if second_moment is not None:
        zero = torch.rand(n, generator=g) < held
        with torch.no_grad():
            p[zero] = 0.0
        grad[zero] = 0.0
        opt.state[p]["exp_avg"][zero] = 0.0
        v[zero] = second_moment
    return p, opt, grad, v


def timed_step(p, opt, grad, v) -> float:
    opt.state[p]["exp_avg_sq"].copy_(v)
    p.grad = grad.clone()
    started = time.perf_counter()
    opt.step()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", type=float, default=12.5, help="millions of weights")
    parser.add_argument("--held", type=float, default=0.9, help="the fraction of them held zeros")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tiny", action="store_true", help="0.1M weights, 2 rounds")
    args = parser.parse_args()
    n = int((0.1 if args.tiny else args.weights) * 1e6)
    rounds = 2 if args.tiny else args.rounds
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, AdamW step on {n / 1e6:g}M weights, "
          f"{args.held:.0%} of them held zeros, medians of {rounds} interleaved rounds (ms, and / no held zeros)")
    print(f"{'held zeros second moment':30s}" + "".join(f"{name:>20s}" for name in IMPLEMENTATIONS))
    runs = {(case, name): build(n, args.held, value, options)
            for case, value in CASES.items() for name, options in IMPLEMENTATIONS.items()}
    times = {key: [] for key in runs}
    for _ in range(rounds):
        for key, run in runs.items():
            times[key].append(timed_step(*run))
    median = {key: statistics.median(t) for key, t in times.items()}
    for case in CASES:
        cells = [f"{median[case, name] * 1e3:9.1f} ({median[case, name] / median['no held zeros', name]:5.2f}x)"
                 for name in IMPLEMENTATIONS]
        print(f"{case:30s}" + "".join(f"{cell:>20s}" for cell in cells))


if __name__ == "__main__":
    main()
