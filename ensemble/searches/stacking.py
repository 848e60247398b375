"""``stacking``: multinomial logistic regression on the members' log-probabilities."""

from __future__ import annotations

import inspect
import math
import warnings

import numpy as np

from ensemble.calibration import log_softmax
from ensemble.searches._base import ConvergenceWarning, _LOG_EPS, _check_inputs, _Search, blas_threads
from zoo.errors import UserInputError


class StackingCombiner(_Search):
    """Multinomial logistic regression on the members' log-probabilities (clipped at ``clip``).

    A learned, non-linear-in-probability combiner: it can undo a member's bias on some
    classes, at the price of C x M x C coefficients that can over-fit a small validation
    set; judge it by its cross-validated score. ``C="auto"`` (default) picks the L2
    strength from ``AUTO_CS`` by an inner 3-fold cross-validation on log loss (so the
    outer CV of ``fit_ensemble`` stays honest: it is nested). It is already fitted on log
    loss, so no member or final temperature is applied. ``weights_`` is the share of
    absolute coefficient mass on each member, for display only.

    Attributes: ``coef_`` [C, M*C], ``intercept_`` [C], ``C_`` (the strength used),
    ``weights_``, ``loss_``, ``score_``, ``converged_``, ``n_iter_``.
    """

    AUTO_CS = (1e-3, 1e-2, 1e-1, 1.0)  # C > 1 (less regularisation) rarely wins on validation-sized data and costs the most iterations

    name = "stacking"
    metrics = ("log_loss",)
    weighted = False
    description = "multinomial logistic regression on the members' log-probabilities"

    def __init__(self, metric: str = "log_loss", combine: str = "arithmetic", C: float | str = "auto",
                 max_iter: int = 1000, clip: float = math.log(1e-7)):
        self.metric = metric
        self.combine = combine  # unused: the regression is the combine rule
        self.C = C
        self.max_iter = max_iter
        self.clip = clip

    def _validate_params(self) -> None:
        self._validate_common()
        if not (self.C == "auto" or (isinstance(self.C, (int, float)) and self.C > 0)):
            raise ValueError(f"C: expected 'auto' or a positive inverse regularisation strength, got {self.C!r}")
        if not (isinstance(self.max_iter, int) and self.max_iter >= 1):
            raise ValueError(f"max_iter: expected an integer >= 1, got {self.max_iter!r}")
        if not self.clip < 0:
            raise ValueError(f"clip: expected a negative log-probability floor, got {self.clip!r}")

    def _blas_work(self, shape) -> float:
        m, n, c = shape if len(shape) == 3 else (0, 0, 0)
        return float(n) * m * c * c  # X [N, M*C] times coefficients [M*C, C]

    def features(self, log_probs: np.ndarray) -> np.ndarray:
        """[N, M*C]: member 0's C log-probabilities, then member 1's, ..."""
        m, n, c = log_probs.shape
        return np.clip(np.asarray(log_probs, dtype=np.float64), self.clip, 0.0).transpose(1, 0, 2).reshape(n, m * c)

    def fit(self, log_probs: np.ndarray, labels: np.ndarray) -> "StackingCombiner":
        """Fit on stacked member log-probabilities [M, N, C] (raw, not tempered) and labels [N]; returns self."""
        with blas_threads(self._blas_work(np.shape(log_probs))):
            return self._fit_stacking(log_probs, labels)

    def fit_true_probs(self, true_probs: np.ndarray):
        raise ValueError("fit_true_probs: stacking learns from every class's log-probability; use fit(log_probs, labels)")

    def _fit_stacking(self, log_probs: np.ndarray, labels: np.ndarray) -> "StackingCombiner":
        from sklearn.exceptions import ConvergenceWarning as SklearnConvergenceWarning
        from sklearn.linear_model import LogisticRegression

        self._validate_params()
        log_probs, labels = _check_inputs(log_probs, labels)
        m, n, c = log_probs.shape
        present = np.unique(labels)
        if len(present) < 2:
            raise UserInputError(f"labels: stacking needs at least 2 classes among the validation labels, got only class {int(present[0])}")
        features = self.features(log_probs)
        with warnings.catch_warnings():
            # Said once below, in zoo's words; the inner search's strong-C fits may stop early, harmlessly.
            warnings.simplefilter("ignore", SklearnConvergenceWarning)
            self.C_ = self.C if self.C != "auto" else self._choose_c(features, labels)
            model = LogisticRegression(C=self.C_, max_iter=self.max_iter).fit(features, labels)
        self.n_iter_ = int(np.max(model.n_iter_))
        self.converged_ = self.n_iter_ < self.max_iter
        if not self.converged_:
            warnings.warn(f"stacking: logistic regression (lbfgs) did not converge in {self.max_iter} iterations; "
                          "raise max_iter or lower C", ConvergenceWarning, stacklevel=2)
        coef, intercept = model.coef_, model.intercept_
        if len(model.classes_) == 2:  # sklearn fits one logit for two classes: log-odds of the second
            coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
        # Classes absent from the fitted labels get a probability of about e^-50 of the rest.
        self.coef_ = np.zeros((c, m * c))
        self.intercept_ = np.full(c, float(intercept.min()) - 50.0)
        self.coef_[model.classes_] = coef
        self.intercept_[model.classes_] = intercept
        mass = np.abs(self.coef_).reshape(c, m, c).sum(axis=(0, 2))
        self.weights_ = mass / mass.sum() if mass.sum() > 0 else np.full(m, 1.0 / m)
        self.loss_ = float(-np.mean(np.clip(self.predict_log_proba(log_probs)[np.arange(n), labels], _LOG_EPS, 0.0)))
        self.score_ = self.loss_
        return self

    def _choose_c(self, features: np.ndarray, labels: np.ndarray) -> float:
        """The strength from ``AUTO_CS`` with the best inner 3-fold log loss (1.0 when a class is too rare to split)."""
        from sklearn.linear_model import LogisticRegressionCV

        if np.bincount(labels)[np.unique(labels)].min() < 3:
            return 1.0
        options = dict(Cs=list(self.AUTO_CS), cv=3, scoring="neg_log_loss", max_iter=self.max_iter, refit=False)
        accepted = inspect.signature(LogisticRegressionCV).parameters
        # scikit-learn >= 1.8 wants these said explicitly (pure L2, new attributes); older ones lack them.
        options.update({k: v for k, v in (("l1_ratios", (0.0,)), ("use_legacy_attributes", False)) if k in accepted})
        search = LogisticRegressionCV(**options)
        search.fit(features, labels)
        chosen = float(np.ravel(search.C_)[0])  # sklearn hands it back with rounding noise
        return min(self.AUTO_CS, key=lambda c: abs(math.log(c) - math.log(chosen)))

    def predict_log_proba(self, log_probs: np.ndarray) -> np.ndarray:
        self._check_fitted()
        log_probs = np.asarray(log_probs)
        if log_probs.ndim != 3 or log_probs.shape[0] * log_probs.shape[2] != self.coef_.shape[1]:
            raise ValueError(f"log_probs: expected [M, N, C] with M*C = {self.coef_.shape[1]}, got shape {log_probs.shape}")
        return log_softmax(self.features(log_probs) @ self.coef_.T + self.intercept_)

    @classmethod
    def from_params(cls, coef, intercept, clip: float) -> "StackingCombiner":
        """A fitted combiner from stored coefficients (the ensemble file's, no pickle)."""
        out = cls(clip=clip)
        out.C_ = None
        out.coef_ = np.asarray(coef, dtype=np.float64)
        out.intercept_ = np.asarray(intercept, dtype=np.float64)
        c = len(out.intercept_)
        if out.coef_.ndim != 2 or out.coef_.shape[0] != c or out.coef_.shape[1] % c:
            raise ValueError(f"coef: expected shape [C, M*C] with C = {c}, got {out.coef_.shape}")
        m = out.coef_.shape[1] // c
        mass = np.abs(out.coef_).reshape(c, m, c).sum(axis=(0, 2))
        out.weights_ = mass / mass.sum() if mass.sum() > 0 else np.full(m, 1.0 / m)
        return out
