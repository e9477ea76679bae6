"""How well ``eval.scaling`` predicts OpenELM-3B's PU from 270M/450M/1.1B-sized results: synthetic laws.

Each replicate draws instances on an exact law z_s = a_s - alpha log N (a few hard ones censored at the
small sizes) and PassUntil runs at the three fit sizes by the sampling plan itself (geometric gaps, r,
cap). It fits with ``eval.scaling.fit`` and compares the prediction for the 3B N with the true mean PU
of the instances each method used. Prints JSON on stdout: the median relative error (bias-corrected
and plug-in) and the coverage of the intervals, per method.

    python benchmarks/passuntil_coverage.py --r 2 --estimator pu --replicates 40
"""

from __future__ import annotations

import argparse
import json
import math

import mlx_openelm  # noqa: F401
import numpy as np

from mlx_openelm.eval.passuntil import estimate
from mlx_openelm.eval.scaling import fit, named_size

SIZES = ("270M", "450M", "1_1B")


def runs_for(rng, a, alpha, sizes, r, cap):
    runs = []
    for n in sizes:
        rows = []
        for i, ai in enumerate(a):
            p = math.exp(-math.exp(ai - alpha * math.log(n)))
            times = np.cumsum(rng.geometric(p, size=r)) if p > 1e-12 else np.full(r, cap + 1)
            censored = bool(times[-1] > cap)
            k = cap if censored else int(times[-1])
            m = int((times <= cap).sum()) if censored else r
            rows.append({"task": "law", "id": str(i), "model": str(n), "n_params": int(n), "r": r, "max_samples": cap,
                         "samples": k, "passes": m, "censored": censored, **estimate(m, k, r, censored, interval=False)})
        runs.append(rows)
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--r", type=int, default=2)
    p.add_argument("--estimator", default="pu")
    p.add_argument("--replicates", type=int, default=40)
    p.add_argument("--bootstrap", type=int, default=200)
    p.add_argument("--instances", type=int, default=60)
    p.add_argument("--alpha", type=float, default=0.35)
    p.add_argument("--cap", type=int, default=10000)
    a = p.parse_args()
    sizes = [named_size(s) for s in SIZES]
    target = named_size("3B")
    cover = {"instance": 0, "shared": 0}
    errors = {"instance": [], "shared": []}
    for rep in range(a.replicates):
        rng = np.random.default_rng(100 + rep)
        intercepts = rng.normal(7.2, 0.3, a.instances)
        intercepts[:5] += 1.5  # hard: censored at the small sizes
        res = fit(runs_for(rng, intercepts, a.alpha, sizes, a.r, a.cap), predict_n=target, bootstrap=a.bootstrap, seed=rep,
                  estimator=a.estimator)["tasks"]["law"]
        truth = np.exp(-np.exp(intercepts - a.alpha * math.log(target)))
        for name in cover:
            m = res["methods"][name]
            used = [int(f["id"]) for f in res["instance_fits"] if (f["fitted"] if name == "instance" else f["shared_a"] is not None)]
            t = truth[used].mean()
            cover[name] += m["interval"][0] <= t <= m["interval"][1]
            errors[name].append((m["pu"] / t - 1, m["pu_plugin"] / t - 1))
    print(json.dumps({
        "r": a.r, "estimator": a.estimator, "replicates": a.replicates, "bootstrap": a.bootstrap, "instances": a.instances,
        "alpha": a.alpha, "cap": a.cap, "fit_sizes": sizes, "target": target,
        "coverage_95": {k: v / a.replicates for k, v in cover.items()},
        "median_rel_error": {k: round(float(np.median([e[0] for e in v])), 4) for k, v in errors.items()},
        "median_rel_error_plugin": {k: round(float(np.median([e[1] for e in v])), 4) for k, v in errors.items()},
    }, indent=2))


if __name__ == "__main__":
    main()
