"""Temperature scaling (Guo et al. 2017): one scalar T, probabilities ``softmax(logits / T)``.

T is fitted on validation log loss. It changes no arg-max, so accuracy stays; it only
makes confidences honest (T > 1 softens an over-confident model, T < 1 sharpens a timid
one). The input may be logits or log-probabilities: both give the same softmax.

The fit is Newton's method on s = 1/T, safeguarded by bisection. With q = softmax(s z),
the row loss ``logsumexp(s z) - s z_y`` is convex in s, with
``dL/ds = E_q[z] - z_y`` and ``d2L/ds2 = Var_q[z]``; from T = 1 it converges in about
five passes over the rows (Brent's method, which the fit used before, needed ~30).
Each pass runs over blocks of rows small enough to stay in cache.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

# A member that is right on every validation sample keeps lowering its log loss as T -> 0;
# the lower bound stops it at 20x sharper, the upper at 20x softer. A fit that ends at a
# bound says something about the member (``at_bound``).
TEMPERATURE_BOUNDS = (0.05, 20.0)
# Values per block of a pass: the chain of elementwise steps on a block stays in cache.
_BLOCK_VALUES = 1 << 17


def log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """Log-softmax in the input's float precision (float32 stays float32)."""
    z = np.asarray(z)
    if not np.issubdtype(z.dtype, np.floating):
        z = z.astype(np.float64)
    shifted = z - z.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


def log_softmax_into(z: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``log_softmax(z)`` over the last axis of a 2-D ``z``, written into ``out`` (which may be ``z``)
    block by block: no temporary as large as ``z``."""
    for start, stop in row_blocks(len(z), z.shape[1]):
        block = z[start:stop]
        x = np.subtract(block, block.max(axis=1, keepdims=True), dtype=out.dtype)
        lse = np.log(np.exp(x).sum(axis=1, keepdims=True))
        np.subtract(x, lse, out=out[start:stop])
    return out


def row_blocks(n: int, c: int, values: int = _BLOCK_VALUES):
    """``(start, stop)`` of consecutive row blocks of about ``values`` values each."""
    rows = max(1, values // max(c, 1))
    for start in range(0, n, rows):
        yield start, min(start + rows, n)


class _Sums(NamedTuple):
    loss: float  # mean over rows of logsumexp(s z) - s z_y
    grad: float  # mean of E_q[z] - z_y
    hess: float  # mean of Var_q[z]


def _temperature_pass(z: np.ndarray, labels: np.ndarray, s: float, rows: np.ndarray | None) -> _Sums:
    """Mean loss and its first two derivatives in s = 1/T over ``rows`` of ``z`` (all when None)."""
    n = len(labels) if rows is None else len(rows)
    c = z.shape[1]
    loss = grad = hess = 0.0
    s32 = np.float32(s)
    ones = np.ones(c, dtype=np.float32)  # row sums as BLAS matrix-vector products: float32 in, ~3x faster than .sum
    for start, stop in row_blocks(n, c, 1 << 18):
        if rows is None:
            block, y = z[start:stop], labels[start:stop]
        else:
            index = rows[start:stop]
            block, y = z[index], labels[index]
        # Shift each row so its maximum is 0: exp(s x) never overflows, for any s.
        x = np.subtract(block, block.max(axis=1, keepdims=True), dtype=np.float32)
        x_true = x[np.arange(stop - start), y].astype(np.float64)
        e = np.multiply(x, s32)
        np.exp(e, out=e)
        s0 = (e @ ones).astype(np.float64)
        np.multiply(e, x, out=e)
        s1 = (e @ ones).astype(np.float64)
        s2 = np.einsum("ij,ij->i", e, x).astype(np.float64)
        mean = s1 / s0
        loss += float(np.sum(np.log(s0) - s * x_true))
        grad += float(np.sum(mean - x_true))
        hess += float(np.sum(np.maximum(s2 / s0 - mean * mean, 0.0)))
    return _Sums(loss / n, grad / n, hess / n)


class TemperatureFit(NamedTuple):
    temperature: float
    log_loss: float  # at the fitted temperature
    log_loss_at_one: float  # at T = 1
    passes: int


def fit_temperature(z: np.ndarray, labels: np.ndarray, rows: np.ndarray | None = None,
                    bounds: tuple[float, float] = TEMPERATURE_BOUNDS, rtol: float = 1e-6,
                    max_passes: int = 100) -> TemperatureFit:
    """The temperature minimising the log loss of ``softmax(z[rows] / T)`` within ``bounds``.

    ``z``: logits or log-probabilities [N, C] (float32 is read as is, without a copy);
    ``rows``: the rows to fit on (None: all). Stops when a Newton step changes s = 1/T by
    less than ``rtol`` relatively, or at a bound whose slope points outside. The log loss
    here is unclipped (a row's true-class probability may go below 1e-15; clipping it
    would make the objective flat there and the fit indifferent to that row).
    """
    low, high = bounds
    s_min, s_max = 1.0 / high, 1.0 / low
    lo, hi = s_min, s_max  # the root of dL/ds lies in [lo, hi] (dL/ds increases with s)
    passes = 0

    def at(s: float) -> _Sums:
        nonlocal passes
        passes += 1
        return _temperature_pass(z, labels, s, rows)

    s = 1.0
    first = current = at(s)
    last_step = 0.0
    for _ in range(max_passes):
        if current.grad > 0:
            hi = s
        else:
            lo = s
        if current.grad == 0.0 or hi / lo <= 1.0 + rtol:
            break
        step = s - current.grad / current.hess if current.hess > 0 else math.nan
        # Newton crawls (steps not shrinking, same direction) where the loss decays
        # exponentially towards a bound, e.g. a member right on every row: look at the bound.
        crawling = last_step and (step - s) * last_step > 0 and abs(step - s) > 0.5 * abs(last_step)
        if not lo < step < hi or crawling:
            bound = s_max if (step >= hi or (crawling and step > s)) else s_min
            if (bound == s_max and hi == s_max) or (bound == s_min and lo == s_min):
                # Newton points past (or crawls towards) a bound not yet tried: try the bound itself.
                edge = at(bound)
                if (bound == s_max and edge.grad <= 0) or (bound == s_min and edge.grad >= 0):
                    s, current = bound, edge
                    break
                lo, hi = (lo, bound) if bound == s_max else (bound, hi)
            if not lo < step < hi:
                step = math.sqrt(lo * hi)  # bisection on log s
        done = abs(step - s) <= rtol * s
        last_step = step - s
        s, current = step, at(step)
        if done:
            break
    return TemperatureFit(float(1.0 / s), float(current.loss), float(first.loss), passes)


def at_bound(temperature: float, bounds: tuple[float, float] = TEMPERATURE_BOUNDS) -> str | None:
    """``"upper"`` or ``"lower"`` when a fitted temperature sits at that bound (within 0.1 %), else None."""
    low, high = bounds
    if temperature >= high * (1 - 1e-3):
        return "upper"
    if temperature <= low * (1 + 1e-3):
        return "lower"
    return None


def subsample_rows(n: int, max_rows: int | None, seed: int = 0, rows: np.ndarray | None = None) -> np.ndarray | None:
    """At most ``max_rows`` of ``rows`` (all of 0..n-1 when None), a seeded sample in increasing order;
    None when no sampling is needed and ``rows`` is None."""
    count = n if rows is None else len(rows)
    if max_rows is None or count <= max_rows:
        return rows
    pick = np.sort(np.random.default_rng(seed).choice(count, size=max_rows, replace=False))
    return pick if rows is None else rows[pick]


class TemperatureScaler:
    """Fit one temperature on validation log loss; sklearn-style (``fit`` returns self).

    Parameters
    ----------
    bounds : (low, high)
        The temperature is searched in this range; a result at a bound means the data
        asked for more (``at_bound``).
    xatol : float
        Relative tolerance on s = 1/T (1e-6: the log loss is flat to ~1e-12 there).

    Attributes
    ----------
    temperature_ : float
    n_evaluations_ : int
        Passes over the rows.
    log_loss_before_, log_loss_after_ : float
        Log loss (of the rows fitted on) at T = 1 and at the fitted T.
    """

    def __init__(self, bounds: tuple[float, float] = TEMPERATURE_BOUNDS, xatol: float = 1e-6):
        self.bounds = bounds
        self.xatol = xatol

    def _validate_params(self) -> None:
        low, high = self.bounds
        if not (0 < low < 1 < high and math.isfinite(high)):
            raise ValueError(f"bounds: expected 0 < low < 1 < high (finite), got {self.bounds}")
        if not self.xatol > 0:
            raise ValueError(f"xatol: expected a positive tolerance, got {self.xatol}")

    def fit(self, logits: np.ndarray, labels: np.ndarray) -> "TemperatureScaler":
        self._validate_params()
        logits = np.asarray(logits)
        labels = np.asarray(labels)
        if logits.ndim != 2:
            raise ValueError(f"logits: expected a 2-D array [N, C], got shape {logits.shape}")
        if labels.shape != (logits.shape[0],) or logits.shape[0] == 0:
            raise ValueError(f"labels: expected shape ({logits.shape[0]},) with N > 0 to match logits {logits.shape}, got {labels.shape}")
        if logits.dtype != np.float32:
            logits = logits.astype(np.float32)
        result = fit_temperature(logits, labels.astype(np.int64, copy=False), None, self.bounds, self.xatol)
        self.temperature_ = result.temperature
        self.log_loss_after_ = result.log_loss
        self.log_loss_before_ = result.log_loss_at_one
        self.n_evaluations_ = result.passes
        return self

    def transform(self, logits: np.ndarray) -> np.ndarray:
        """Log-probabilities at the fitted temperature."""
        if not hasattr(self, "temperature_"):
            raise RuntimeError("TemperatureScaler is not fitted; call fit(logits, labels) first")
        return apply_temperature(logits, self.temperature_)

    def predict_proba(self, logits: np.ndarray) -> np.ndarray:
        return np.exp(self.transform(logits))


def apply_temperature(logits: np.ndarray, temperature: float) -> np.ndarray:
    """``log_softmax(logits / temperature)``, in the input's float precision."""
    if not temperature > 0:
        raise ValueError(f"temperature: expected a positive number, got {temperature}")
    logits = np.asarray(logits)
    if temperature == 1.0:
        return log_softmax(logits)
    return log_softmax(logits / logits.dtype.type(temperature) if np.issubdtype(logits.dtype, np.floating) else logits / temperature)
