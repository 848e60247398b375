"""Temperature scaling (Guo et al. 2017): one scalar T, probabilities ``softmax(logits / T)``.

T is fitted on validation log loss. It changes no arg-max, so accuracy stays; it only
makes confidences honest (T > 1 softens an over-confident model, T < 1 sharpens a timid
one). The input may be logits or log-probabilities: both give the same softmax.
"""

from __future__ import annotations

import math

import numpy as np

from ensemble.metrics import EPS

# A member that is right on every validation sample keeps lowering its log loss as T -> 0;
# the lower bound stops it at 20x sharper, the upper at 20x softer.
TEMPERATURE_BOUNDS = (0.05, 20.0)


def log_softmax(z: np.ndarray, axis: int = -1) -> np.ndarray:
    """Log-softmax in the input's float precision (float32 stays float32)."""
    z = np.asarray(z)
    if not np.issubdtype(z.dtype, np.floating):
        z = z.astype(np.float64)
    shifted = z - z.max(axis=axis, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=axis, keepdims=True))


class TemperatureScaler:
    """Fit one temperature on validation log loss; sklearn-style (``fit`` returns self).

    Parameters
    ----------
    bounds : (low, high)
        The temperature is searched in this range, on a log scale, with scipy's bounded
        scalar minimiser; a result at a bound means the data asked for more.
    xatol : float
        Tolerance on log T (1e-4: T to 0.01 %; the log loss is flat to ~1e-8 there).

    Attributes
    ----------
    temperature_ : float
    n_evaluations_ : int
    log_loss_before_, log_loss_after_ : float
        Validation log loss at T = 1 and at the fitted T.
    """

    def __init__(self, bounds: tuple[float, float] = TEMPERATURE_BOUNDS, xatol: float = 1e-4):
        self.bounds = bounds
        self.xatol = xatol

    def _validate_params(self) -> None:
        low, high = self.bounds
        if not (0 < low < 1 < high and math.isfinite(high)):
            raise ValueError(f"bounds: expected 0 < low < 1 < high (finite), got {self.bounds}")
        if not self.xatol > 0:
            raise ValueError(f"xatol: expected a positive tolerance, got {self.xatol}")

    def fit(self, logits: np.ndarray, labels: np.ndarray) -> "TemperatureScaler":
        from scipy.optimize import minimize_scalar

        self._validate_params()
        logits = np.asarray(logits)
        labels = np.asarray(labels)
        if logits.ndim != 2:
            raise ValueError(f"logits: expected a 2-D array [N, C], got shape {logits.shape}")
        if labels.shape != (logits.shape[0],) or logits.shape[0] == 0:
            raise ValueError(f"labels: expected shape ({logits.shape[0]},) with N > 0 to match logits {logits.shape}, got {labels.shape}")
        # Shift each row so its maximum is 0: exp(z / T) then never overflows, for any T.
        z = logits.astype(np.float32) - logits.max(axis=1, keepdims=True).astype(np.float32)
        z_true = z[np.arange(len(labels)), labels].astype(np.float64)
        floor = math.log(EPS)
        evaluations = 0

        buffer = np.empty_like(z)  # one [N, C] scratch array for every evaluation

        def nll(log_t: float) -> float:
            nonlocal evaluations
            evaluations += 1
            inv_t = np.float32(math.exp(-log_t))
            np.multiply(z, inv_t, out=buffer)
            np.exp(buffer, out=buffer)
            lse = np.log(buffer.sum(axis=1)).astype(np.float64)
            return float(-np.mean(np.maximum(z_true * float(inv_t) - lse, floor)))

        low, high = self.bounds
        result = minimize_scalar(nll, bounds=(math.log(low), math.log(high)), method="bounded",
                                 options={"xatol": self.xatol, "maxiter": 500})
        if not result.success:
            raise RuntimeError(f"temperature scaling did not converge: scipy's minimize_scalar says {result.message!r} "
                               f"after {result.nfev} evaluations")
        self.temperature_ = float(math.exp(result.x))
        self.log_loss_after_ = float(result.fun)
        self.log_loss_before_ = nll(0.0)
        if self.log_loss_before_ < self.log_loss_after_:  # Brent can miss T = 1 on a flat valley
            self.temperature_, self.log_loss_after_ = 1.0, self.log_loss_before_
        self.n_evaluations_ = evaluations
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
