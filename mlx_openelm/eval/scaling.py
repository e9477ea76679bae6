"""The task scaling law of PassUntil: fit ``z = log(-log PU) = a - alpha log N`` and predict a larger model.

Input: PassUntil result rows (``eval.passuntil``) of several model sizes; N is each row's
``n_params`` (total parameters from the model's config) or ``n_params_nonembedding``. Per task:

- **instance**: one weighted least-squares line per instance over the sizes where it was measured
  and not censored (weights ``1/Var z`` with ``Var z ~ (1-p)/(r (log p)^2)``, the delta method on the
  negative-binomial estimate, evaluated once at the measured p and then at the shared-slope fit's
  fitted p: weights from the measured p favour the points that came out low); the task prediction is
  the mean of the instances' predicted PU.
- **shared**: one slope ``alpha`` per task and one intercept per instance (instances with a single
  usable size still get their intercept); the mean of the predicted PU.
- **dataset**: one line through ``log(-log mean PU)`` of the instances measured at every size
  (censored runs enter with their unbiased ``m/K``).

Censored instances (no ``r`` passes within the cap) are left out of the instance/shared fits and
reported with a bound: the task mean with them at 0 (lower) and at the shared-slope extrapolation of
their interval's upper end at the largest measured size (upper). Intervals are bootstrap percentiles
over instances (resampled with replacement) and over sampling noise (each measurement redrawn from
its own sampling plan at the estimated p). With four or more sizes the curvature of
``F(log N) = log(-log mean PU)`` is tested (the paper's Def. 1): the quadratic coefficient's
bootstrap interval above 0 is convex (sub-scaling), below 0 concave (accelerated emergence), else linear.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from ..utils import Progress

ESTIMATORS = ("pu", "pu_log", "pu_mle", "p_exact")
SIZE_KEYS = ("n_params", "n_params_nonembedding")
P_MAX = 1 - 1e-9  # PU = 1 has no z


def digamma_int(r):
    """psi(r) for integer r >= 1: -gamma + sum_{j<r} 1/j (elementwise)."""
    r = np.asarray(r, dtype=np.int64)
    table = np.concatenate([[np.nan], -np.euler_gamma + np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, max(int(r.max()), 1)))])])
    return table[r]


def point_estimate(kind: str, r, k):
    """PU from a finished run (r-th pass at sample k): ``pu`` = (r-1)/(k-1) (unbiased for p), ``pu_mle`` = r/k,
    ``pu_log`` = exp(psi(r))/k (unbiased for log p when p is small: k p ~ Gamma(r)), which is what
    ``log(-log PU)`` needs; ``pu`` biases log p down by psi(r) - log(r-1) (0.42 nats at r = 2)."""
    r = np.asarray(r, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    if kind == "pu_mle":
        est = r / k
    elif kind == "pu_log":
        est = np.exp(digamma_int(np.maximum(r, 1).astype(np.int64))) / k
    else:
        est = np.where(k > 1, (r - 1) / np.maximum(k - 1, 1), 1.0)
    return clip_all_passed(np.minimum(est, 1.0), k)


def clip_all_passed(p, k):
    """A run whose first r samples all passed estimates PU = 1 (z = -inf): use at most 1 - 1/(2K)."""
    return np.minimum(p, 1 - 0.5 / np.maximum(k, 1))


def z_of(p):
    """``log(-log p)``."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-300, P_MAX)
    return np.log(-np.log(p))


def pu_of(z):
    """Inverse of ``z_of``: ``exp(-exp(z))``."""
    return np.exp(-np.exp(np.asarray(z, dtype=np.float64)))


def var_z(p, r):
    """Var of ``log(-log p_hat)`` for a negative-binomial estimate with ``r`` passes (delta method)."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-300, P_MAX)
    return (1 - p) / (np.asarray(r, dtype=np.float64) * np.log(p) ** 2)


def named_size(name: str, size_key: str = "n_params") -> int:
    """N of a released OpenELM size ('270M', '450M', '1.1B', '3B') from its configuration."""
    from ..config import ModelArgs

    args = ModelArgs.from_name(name)
    total = int(args.num_parameters())
    return total if size_key == "n_params" else total - args.vocab_size * args.model_dim


# ----------------------------------------------------------------------------------- data


def _group(runs: Sequence[Sequence[Dict[str, Any]]], size_key: str):
    """{N: {"models": {...}, "rows": {(task, id): row}}} from lists of rows."""
    sizes: Dict[int, Dict[str, Any]] = {}
    for rows in runs:
        for row in rows:
            if size_key not in row:
                raise ValueError(f"result rows lack {size_key!r}: were they written by eval.passuntil?")
            n = int(row[size_key])
            entry = sizes.setdefault(n, {"models": set(), "rows": {}})
            entry["models"].add(str(row.get("model", "")))
            entry["rows"][(str(row.get("task", "data")), str(row["id"]))] = row
    return sizes


class _Task:
    """Arrays of one task: instances x sizes."""

    def __init__(self, keys, sizes, grid, estimator):
        self.keys = keys
        S, M = len(keys), len(sizes)
        self.p = np.full((S, M), np.nan)
        self.present = np.zeros((S, M), bool)
        self.censored = np.zeros((S, M), bool)
        self.r = np.ones((S, M))
        self.cap = np.ones((S, M))
        self.p_high = np.full((S, M), np.nan)
        self.sampled = estimator != "p_exact"
        self.estimator = estimator
        for i, key in enumerate(keys):
            for j, n in enumerate(sizes):
                row = grid[n]["rows"].get(key)
                if row is None:
                    continue
                value = row.get("pu" if estimator == "pu_log" else estimator)
                if value is None:
                    raise ValueError(f"row {key} of the {n}-parameter model has no {estimator!r} (run without --no-sampling, "
                                     "or fit estimator='p_exact')")
                self.present[i, j] = True
                self.p[i, j] = float(value)
                if self.sampled:
                    self.censored[i, j] = bool(row.get("censored"))
                    self.r[i, j] = float(row.get("r", 1))
                    self.cap[i, j] = float(row.get("max_samples", row.get("samples", 1)))
                    high = row.get("pu_high")
                    self.p_high[i, j] = np.nan if high is None else float(high)
                    if not self.censored[i, j] and row.get("samples"):
                        self.p[i, j] = float(point_estimate(estimator, self.r[i, j], float(row["samples"])))
                else:
                    self.censored[i, j] = float(value) <= 0
                    self.p_high[i, j] = float(value)


def load_runs(paths: Sequence) -> List[List[Dict[str, Any]]]:
    from .passuntil import read_results

    return [read_results(Path(p)) for p in paths]


# ----------------------------------------------------------------------------------- fits


def _valid(p, present, censored):
    return present & ~censored & np.isfinite(p) & (p > 0)


def _weights(p, r, sampled):
    if not sampled:
        return np.ones_like(p)
    w = 1.0 / np.maximum(var_z(p, r), 1e-12)
    return np.where(np.isfinite(w), w, 0.0)


def fit_instances(x, p, valid, w):
    """Per-instance WLS of z on x: (a, alpha, fitted) with z = a - alpha x; rows with < 2 points unfitted."""
    z = np.where(valid, z_of(np.where(valid, p, 0.5)), 0.0)
    w = np.where(valid, w, 0.0)
    sw = w.sum(1)
    fitted = (valid.sum(1) >= 2) & (sw > 0)
    sw_ = np.where(sw > 0, sw, 1.0)
    xbar = (w * x).sum(1) / sw_
    zbar = (w * z).sum(1) / sw_
    dx = x[None, :] - xbar[:, None]
    sxx = (w * dx * dx).sum(1)
    slope = np.where(sxx > 0, (w * dx * (z - zbar[:, None])).sum(1) / np.where(sxx > 0, sxx, 1.0), np.nan)
    a = zbar - slope * xbar
    fitted &= sxx > 0
    return a, -slope, fitted


def fit_shared(x, p, valid, w):
    """One slope for all instances, one intercept each: (a per instance, alpha, usable rows)."""
    z = np.where(valid, z_of(np.where(valid, p, 0.5)), 0.0)
    w = np.where(valid, w, 0.0)
    sw = w.sum(1)
    usable = valid.any(1) & (sw > 0)
    sw_ = np.where(sw > 0, sw, 1.0)
    xbar = (w * x).sum(1) / sw_
    zbar = (w * z).sum(1) / sw_
    dx = (x[None, :] - xbar[:, None]) * usable[:, None]
    sxx = (w * dx * dx).sum()
    if sxx <= 0:
        return np.full(len(p), np.nan), np.nan, usable & False
    slope = (w * dx * (z - zbar[:, None])).sum() / sxx
    a = zbar - slope * xbar
    return a, -slope, usable


def line_fit(x, z, w):
    """Weighted least squares z = a - alpha x: (a, alpha)."""
    sw = w.sum()
    xbar, zbar = (w * x).sum() / sw, (w * z).sum() / sw
    sxx = (w * (x - xbar) ** 2).sum()
    slope = (w * (x - xbar) * (z - zbar)).sum() / sxx
    return zbar - slope * xbar, -slope


def quad_coef(x, z, w):
    """Weighted quadratic z = b0 + b1 u + b2 u^2 in u = x - mean(x): b2 (> 0 convex)."""
    u = x - x.mean()
    A = np.stack([np.ones_like(u), u, u * u], 1) * np.sqrt(w)[:, None]
    coef, *_ = np.linalg.lstsq(A, z * np.sqrt(w), rcond=None)
    return float(coef[2])


def _dataset_points(p, present, censored, r, cap, sampled):
    """(mean PU per size, Var of that mean) over the instances present at every size."""
    keep = present.all(1)
    if not keep.any():
        return None, None, keep
    q = p[keep]
    mean = q.mean(0)
    if sampled:
        var_each = np.where(censored[keep], np.maximum(q, 1.0 / cap[keep]) * (1 - q) / cap[keep], q * q * (1 - q) / r[keep])
        var = var_each.sum(0) / keep.sum() ** 2
    else:
        var = np.ones_like(mean)
    return mean, var, keep


def _predict_all(x, xt, t: "_Task", p, censored):
    """The three predictions (and the quadratic coefficient) for one (possibly resampled) data set."""
    valid = _valid(p, t.present, censored)
    w = _weights(p, t.r, t.sampled)
    if t.sampled:
        # weights from the measured p favour the points whose p came out low (|log p| large): refit once
        # with weights from the shared-slope fit's fitted values (iteratively reweighted least squares)
        sa0, salpha0, usable0 = fit_shared(x, p, valid, w)
        if np.isfinite(salpha0):
            p_fit = pu_of(sa0[:, None] - salpha0 * x[None, :])
            w = np.where(usable0[:, None], _weights(np.clip(p_fit, 1e-300, 1 - 1e-6), t.r, True), w)
    out: Dict[str, Any] = {}
    a, alpha, fitted = fit_instances(x, p, valid, w)
    pred_i = pu_of(a - alpha * xt)
    out["instance"] = float(pred_i[fitted].mean()) if fitted.any() else np.nan
    out["instance_alpha"] = float(np.median(alpha[fitted])) if fitted.any() else np.nan
    sa, salpha, usable = fit_shared(x, p, valid, w)
    pred_s = pu_of(sa - salpha * xt)
    out["shared"] = float(pred_s[usable].mean()) if usable.any() else np.nan
    out["shared_alpha"] = float(salpha)
    mean, var, keep = _dataset_points(p, t.present, censored, t.r, t.cap, t.sampled)
    if mean is not None and np.all(mean > 0) and np.all(mean < 1):
        zm = z_of(mean)
        wm = 1.0 / np.maximum(var / (mean * np.log(mean)) ** 2, 1e-12) if t.sampled else np.ones_like(mean)
        da, dalpha = line_fit(x, zm, wm)
        out["dataset"] = float(pu_of(da - dalpha * xt))
        out["dataset_alpha"], out["dataset_log_c"] = float(dalpha), float(da)
    else:
        out.update(dataset=np.nan, dataset_alpha=np.nan, dataset_log_c=np.nan)
    out["_fits"] = (a, alpha, fitted, sa, salpha, usable, valid)
    return out


def _dataset_quad(x, t: "_Task", p, censored) -> float:
    mean, var, keep = _dataset_points(p, t.present, censored, t.r, t.cap, t.sampled)
    if mean is None or not (np.all(mean > 0) and np.all(mean < 1)):
        return np.nan
    wm = 1.0 / np.maximum(var / (mean * np.log(mean)) ** 2, 1e-12) if t.sampled else np.ones_like(mean)
    return quad_coef(x, z_of(mean), wm)


def curvature(x, t: "_Task", bootstrap: int, rng: np.random.Generator):
    """The quadratic coefficient of the dataset-level F(log N) and its bootstrap replicates (finite ones)."""
    q0 = _dataset_quad(x, t, t.p, t.censored)
    reps = []
    for _ in range(bootstrap):
        tb = _subset(t, rng.integers(0, len(t.keys), len(t.keys)))
        pb, cb = resample_measurements(rng, tb.p, tb.present, tb.censored, tb.r, tb.cap, t.estimator) if t.sampled else (tb.p, tb.censored)
        reps.append(_dataset_quad(x, tb, pb, cb))
    q = np.array(reps, dtype=np.float64)
    return q0, q[np.isfinite(q)]


def resample_measurements(rng: np.random.Generator, p, present, censored, r, cap, kind: str = "pu"):
    """Redraw every sampled measurement from its own plan (until r passes, at most cap samples) at p:
    the unbiased estimate and the censoring flag of the new run."""
    S, M = p.shape
    rr = int(np.max(r)) if r.size else 1
    q = np.clip(np.nan_to_num(p, nan=0.0), 0.0, 1.0)
    new_p = np.zeros_like(q)
    new_c = np.zeros_like(censored)
    pos = q > 0
    gaps = rng.geometric(np.where(pos, q, 0.5)[..., None], size=(S, M, rr)).astype(np.float64)
    ranks = np.arange(1, rr + 1)
    gaps = np.where(ranks[None, None, :] <= r[..., None], gaps, 0.0)
    times = np.cumsum(gaps, -1)
    k = times[..., -1]  # the r-th pass
    done = pos & (k <= cap)
    new_p = np.where(done, point_estimate(kind, r, np.maximum(k, 1)), 0.0)
    m = ((times <= cap[..., None]) & (ranks[None, None, :] <= r[..., None])).sum(-1)
    new_c = present & ~done
    new_p = np.where(new_c, np.where(pos, m / cap, 0.0), new_p)
    return np.where(present, new_p, np.nan), new_c


def fit(
    runs: Sequence[Sequence[Dict[str, Any]]],
    *,
    predict_n: Optional[float] = None,
    predict_name: Optional[str] = None,
    size_key: str = "n_params",
    estimator: str = "pu",
    bootstrap: int = 1000,
    confidence: float = 0.95,
    include_guessable: bool = False,
    seed: int = 0,
    progress: Optional[Progress] = None,
) -> Dict[str, Any]:
    """Fit the task scaling law to PassUntil result rows of several sizes and predict ``predict_n``
    (or the released size ``predict_name``; default: the largest measured size, held out if more
    than two sizes). A size measured at the target N is held out of the fits and compared.
    Returns a JSON-able dict (``tasks``: per task fits, predictions, intervals, censoring, curvature;
    ``table``: prediction vs measured rows)."""
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator={estimator!r}: choose one of {', '.join(ESTIMATORS)}")
    if size_key not in SIZE_KEYS:
        raise ValueError(f"size_key={size_key!r}: choose one of {', '.join(SIZE_KEYS)}")
    if bootstrap < 0:
        raise ValueError(f"bootstrap={bootstrap} must be >= 0")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence} must be in (0, 1)")
    grid = _group(runs, size_key)
    if predict_name is not None:
        predict_n = named_size(predict_name, size_key)
    all_sizes = sorted(grid)
    if predict_n is None:
        if len(all_sizes) < 3:
            raise ValueError("give predict_n or predict_name (the size to predict) when fewer than 3 sizes are measured")
        predict_n = all_sizes[-1]
    predict_n = float(predict_n)
    target = [n for n in all_sizes if abs(n - predict_n) <= 1e-3 * predict_n]
    fit_sizes = [n for n in all_sizes if n not in target]
    if len(fit_sizes) < 2:
        raise ValueError(f"the fits need results of at least 2 model sizes other than the target (got {len(fit_sizes)})")
    x, xt = np.log(np.array(fit_sizes, dtype=np.float64)), math.log(predict_n)
    want_quad = len(all_sizes) >= 4  # the curvature test uses every measured size
    x_all = np.log(np.array(all_sizes, dtype=np.float64))
    rng = np.random.default_rng(seed)

    tasks_keys: Dict[str, List] = defaultdict(list)
    guess: Dict[str, int] = defaultdict(int)
    for n in all_sizes:
        for key, row in grid[n]["rows"].items():
            if row.get("guessable") and not include_guessable:
                guess[key[0]] += n == all_sizes[0]
                continue
            if n in fit_sizes and key not in tasks_keys[key[0]]:
                tasks_keys[key[0]].append(key)
    result_tasks: Dict[str, Any] = {}
    table = []
    names = sorted(tasks_keys)
    for ti, task in enumerate(names):
        keys = sorted(tasks_keys[task], key=lambda k: (len(k[1]), k[1]))
        t = _Task(keys, fit_sizes, grid, estimator)
        base = _predict_all(x, xt, t, t.p, t.censored)
        a, alpha, fitted, sa, salpha, usable, valid = base.pop("_fits")
        S = len(keys)
        # censoring: instances without a fit, and their bound
        excluded = ~fitted
        last_j = np.where(t.present, np.arange(len(fit_sizes))[None, :], -1).max(1)
        p_hi_last = np.array([t.p_high[i, j] if j >= 0 else 1.0 for i, j in enumerate(last_j)])
        p_hi_last = np.where(np.isfinite(p_hi_last), p_hi_last, 1.0)
        x_last = np.array([x[j] if j >= 0 else x[-1] for j in last_j])
        sal = salpha if np.isfinite(salpha) else 0.0
        upper_each = pu_of(z_of(p_hi_last) - sal * (xt - x_last))
        pred_i = pu_of(a - alpha * xt)
        bound = {
            "instances_excluded": int(excluded.sum()),
            "instances_censored_somewhere": int((t.censored & t.present).any(1).sum()),
            "task_pu_lower": None, "task_pu_upper": None,
            "rule": "task mean over all instances: the fitted ones within the per-instance interval, the excluded ones "
                    "between 0 (lower) and the shared-slope extrapolation of the upper end of their interval at the "
                    "largest size where they were measured (upper)",
        }
        # bootstrap
        boots = defaultdict(list)
        for b in range(bootstrap):
            idx = rng.integers(0, S, S)
            tb = _subset(t, idx)
            if t.sampled:
                pb, cb = resample_measurements(rng, tb.p, tb.present, tb.censored, tb.r, tb.cap, t.estimator)
            else:
                pb, cb = tb.p, tb.censored
            res = _predict_all(x, xt, tb, pb, cb)
            res.pop("_fits")
            for k_, v in res.items():
                boots[k_].append(v)
            if progress and (b + 1) % 50 == 0:
                progress(f"bootstrap {task}", b + 1, bootstrap)

        def interval(name):
            is_pu = name in ("instance", "shared", "dataset")
            return basic_interval(base[name], boots.get(name, []), confidence, z_of if is_pu else None, pu_of if is_pu else None)

        iv_i = interval("instance")
        if iv_i is not None:
            share = fitted.sum() / S
            bound["task_pu_lower"] = float(iv_i[0] * share)
            bound["task_pu_upper"] = float(iv_i[1] * share + np.where(excluded, upper_each, 0.0).sum() / S)
        measured = _measured(grid, target, keys, estimator, fitted, usable, valid, t.present)
        methods = {}
        for name, n_used in (("instance", int(fitted.sum())), ("shared", int(usable.sum())),
                             ("dataset", int(t.present.all(1).sum()))):
            iv = interval(name)
            methods[name] = {"pu": iv[2] if iv and t.sampled else _num(base[name]), "pu_plugin": _num(base[name]), "interval": iv and iv[:2],
                             "instances": n_used,
                             "alpha": _num(base[f"{name}_alpha"]), "alpha_interval": (interval(f"{name}_alpha") or [None, None])[:2],
                             "measured": measured.get(name) if measured else None}
            if name == "dataset":
                methods[name]["log_c"] = _num(base["dataset_log_c"])
            m_ = methods[name]["measured"]
            table.append({"task": task, "method": name, "predicted": methods[name]["pu"],
                          "low": (methods[name]["interval"] or [None, None])[0],
                          "high": (methods[name]["interval"] or [None, None])[1], "measured": m_,
                          "rel_error": (methods[name]["pu"] / m_ - 1) if m_ and methods[name]["pu"] is not None else None})
        task_out: Dict[str, Any] = {
            "instances": S, "guessable_dropped": guess.get(task, 0), "methods": methods, "censored": bound,
            "points": _points(t, x, fit_sizes),
            "instance_fits": [{"id": k[1], "a": _num(a[i]), "alpha": _num(alpha[i]), "fitted": bool(fitted[i]),
                               "shared_a": _num(sa[i]) if usable[i] else None, "predicted": _num(pred_i[i]) if fitted[i] else None}
                              for i, k in enumerate(keys)],
        }
        if want_quad:
            q0, q = curvature(x_all, _Task(keys, all_sizes, grid, estimator), bootstrap, rng)
            ci = basic_interval(q0, q, confidence)
            ci = ci and ci[:2]
            shape = "linear"
            if ci and ci[0] > 0:
                shape = "convex"
            elif ci and ci[1] < 0:
                shape = "concave"
            task_out["curvature"] = {
                "shape": shape, "meaning": {"convex": "sub-scaling", "linear": "scaling-law growth",
                                            "concave": "accelerated emergence"}[shape],
                "quadratic_coef": _num(q0), "interval": ci, "sizes": len(all_sizes),
                "p_convex": float((2 * q0 - q > 0).mean()) if len(q) and math.isfinite(q0) else None, "confidence": confidence,
            }
        result_tasks[task] = task_out
        if progress:
            progress("tasks", ti + 1, len(names))
    return {
        "size_key": size_key,
        "size_meaning": "total parameters from the model config" if size_key == "n_params"
        else "non-embedding parameters (total minus the token embedding) from the model config",
        "estimator": estimator,
        "sizes": [{"n": n, "models": sorted(grid[n]["models"]), "role": "target" if n in target else "fit",
                   "instances": len(grid[n]["rows"])} for n in all_sizes],
        "target": {"n": predict_n, "name": predict_name, "measured": bool(target)},
        "extrapolation_decades": float((xt - x[-1]) / math.log(10)),
        "fit_span_decades": float((x[-1] - x[0]) / math.log(10)),
        "bootstrap": bootstrap, "confidence": confidence, "include_guessable": include_guessable,
        "tasks": result_tasks, "table": table,
    }


def basic_interval(estimate, replicates, confidence, transform=None, inverse=None):
    """The basic (reverse-percentile) bootstrap interval ``[2t - q_hi, 2t - q_lo]`` and the bias-corrected
    estimate ``2t - mean``, in ``transform`` space (``z_of`` for PU, so the interval stays in (0, 1)).
    Unlike the percentile interval it corrects the bias the replicates show: ``z`` of a noisy PU estimate
    is biased, and the parametric resampling reproduces that bias on top of it."""
    v = np.asarray(replicates, dtype=np.float64)
    v = v[np.isfinite(v)]
    if not len(v) or estimate is None or not math.isfinite(float(estimate)):
        return None
    f = transform or (lambda u: np.asarray(u, dtype=np.float64))
    g = inverse or (lambda u: u)
    t, fv = float(f(estimate)), f(v)
    fv = fv[np.isfinite(fv)]
    if not len(fv):
        return None
    lo_q, hi_q = (1 - confidence) / 2, 1 - (1 - confidence) / 2
    a, b = 2 * t - float(np.quantile(fv, hi_q)), 2 * t - float(np.quantile(fv, lo_q))
    ends = sorted([float(g(a)), float(g(b))])
    return [ends[0], ends[1], float(g(2 * t - float(fv.mean())))]


def _num(v):
    v = float(v)
    return v if math.isfinite(v) else None


def _subset(t: "_Task", idx) -> "_Task":
    new = object.__new__(_Task)
    for name in ("p", "present", "censored", "r", "cap", "p_high"):
        setattr(new, name, getattr(t, name)[idx])
    new.keys = [t.keys[i] for i in idx]
    new.sampled, new.estimator = t.sampled, t.estimator
    return new


def _points(t: "_Task", x, sizes):
    mean, var, keep = _dataset_points(t.p, t.present, t.censored, t.r, t.cap, t.sampled)
    return [{"n": n, "log_n": float(x[j]), "mean_pu": _num(mean[j]) if mean is not None else None,
             "se": _num(math.sqrt(var[j])) if mean is not None and t.sampled else None,
             "censored": int((t.censored[:, j] & t.present[:, j]).sum()), "measured": int(t.present[:, j].sum())}
            for j, n in enumerate(sizes)]


def _measured(grid, target, keys, estimator, fitted, usable, valid_fit, present_fit):
    """Mean measured PU at the target size over each method's instances."""
    if not target:
        return None
    rows = {}
    for n in target:
        rows.update(grid[n]["rows"])
    vals = np.array([float(rows[k].get(estimator) or 0.0) if k in rows else np.nan for k in keys])
    sets = {"instance": fitted, "shared": usable, "dataset": present_fit.all(1)}
    out = {}
    for name, mask in sets.items():
        m = mask & np.isfinite(vals)
        out[name] = float(vals[m].mean()) if m.any() else None
    return out


# ----------------------------------------------------------------------------------- plot


def plot(report: Dict[str, Any], path) -> Path:
    """``log(-log PU)`` against ``log N`` per task: the measured means, a sample of instance lines, the
    dataset-level fit, each method's prediction with its interval, and the measured target if any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..utils import atomic_write

    tasks = list(report["tasks"].items())
    cols = min(3, max(1, len(tasks)))
    rows = math.ceil(len(tasks) / cols) if tasks else 1
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 4.2 * rows), squeeze=False)
    xt = math.log(report["target"]["n"])
    colors = {"instance": "#1f77b4", "shared": "#2ca02c", "dataset": "#d62728"}
    for ax, (task, res) in zip(axes.flat, tasks):
        pts = [p for p in res["points"] if p["mean_pu"] and 0 < p["mean_pu"] < 1]
        xs = np.array([p["log_n"] for p in res["points"]])
        for inst in res["instance_fits"][:40]:
            if inst["fitted"]:
                xx = np.array([xs[0], xt])
                ax.plot(xx, inst["a"] - inst["alpha"] * xx, color="0.8", lw=0.6, zorder=1)
        if pts:
            ax.scatter([p["log_n"] for p in pts], z_of([p["mean_pu"] for p in pts]), color="k", zorder=3, label="mean PU (fit sizes)")
        d = res["methods"]["dataset"]
        if d["alpha"] is not None:
            xx = np.linspace(xs[0], xt, 50)
            ax.plot(xx, d["log_c"] - d["alpha"] * xx, color=colors["dataset"], lw=1.5, label=f"dataset fit, alpha={d['alpha']:.2f}")
        for k, (name, m) in enumerate(res["methods"].items()):
            if m["pu"] is None:
                continue
            xo = xt + (k - 1) * 0.03
            zc = float(z_of(m["pu"]))
            if m["interval"]:  # z falls as PU rises
                ax.vlines(xo, float(z_of(m["interval"][1])), float(z_of(m["interval"][0])), color=colors[name], lw=2, alpha=0.6)
            ax.plot([xo], [zc], "o", color=colors[name], label=f"{name}: {m['pu']:.3g}")
            if m["measured"] and name == "dataset":
                ax.plot([xt], [float(z_of(m["measured"]))], "*", color="k", ms=12, label=f"measured: {m['measured']:.3g}")
        ax.axvline(xt, color="0.6", ls=":", lw=1)
        ax.set_title(task + (f" ({res['curvature']['shape']})" if "curvature" in res else ""))
        ax.set_xlabel(f"log N ({report['size_key']})")
        ax.set_ylabel("log(-log PU)")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(tasks):]:
        ax.axis("off")
    fig.tight_layout()
    out = atomic_write(path, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return out
