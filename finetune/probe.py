"""Linear probes: a multinomial logistic regression fitted on a frozen pretrained backbone's pooled features.

Each image's pooled features are what the final Linear sees (timm ``forward_features``, then
``forward_head(pre_logits=True)``), so EfficientNet's conv_head or ConvNeXt's head norm stay part
of the features; the fitted weights go into the timm classifier (``model.get_classifier()``).

- The L2 strength is chosen by cross-validated log loss on the rows it is given, as scikit-learn's
  ``LogisticRegressionCV`` chooses it, with a torch L-BFGS that solves the inner folds together
  (``LinearProbe``). With augmented views of each image (``TrainFeatures``), the inner folds keep
  all views of one image together, so no image is on both sides.
- The fit sees standardised features; the head absorbs the standardisation exactly
  (``W' = W / scale``, ``b' = b - W' @ mean``), so plain timm reproduces the fit's own
  probabilities. With two classes the fit has one logit (log-odds of class 1), as scikit-learn's
  binomial: the head gets the rows ``[0, w]``, which give the same softmax.

Probe runs (``zoo finetune --linear-probe``) are written by ``finetune.probe_run``; LP-FT's
starting head (``--head-init probe``) is set up by ``finetune.lpft``.

Over 400 lines on purpose: the estimator and the batched L-BFGS it runs (``_Eigenbasis``,
``_Logistic``, ``_lbfgs``) share one objective and its scaling, and are read together.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from finetune import loaders
from finetune.config import FinetuneConfig
from finetune.engine import Hardware, predict_logits, seed_everything
from zoo.data import Sample
from zoo.errors import UserInputError
from zoo.progress import progress

# Inverse L2 strengths tried (on standardised features), strongest first; 10^-4 .. 10^2 in half decades.
DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 2, 13))
# L-BFGS stops a fit when no gradient entry of its mean-scaled objective (``_Logistic``) is above this: scikit-learn's
# lbfgs tolerance, on the same function.
DEFAULT_TOL = 1e-4
# The refit is one problem and its solution is the probe: it goes to a tenth of tol (measured: a few more iterations,
# probabilities ~10x closer to the exact optimum than scikit-learn's refit at tol).
REFIT_TOL = 0.1
LBFGS_MEMORY = 10  # curvature pairs kept
ARMIJO = 1e-4  # the decrease a step must reach, as a fraction of the gradient's prediction
MAX_HALVINGS = 30  # a step cut 2^30 times gains nothing: the line search has failed
# The logistic loss's curvature per unit feature variance where nothing is fitted yet (p = 1/2); L-BFGS's coordinates
# are scaled by it (``_Logistic``).
CURVATURE = 0.25
NULL_SPACE = 1e-12  # eigenvalues below this fraction of the largest are rounding: no row varies along them
EPS = float(np.finfo(np.float64).eps)  # scikit-learn's log_loss clips probabilities to [eps, 1 - eps]


class ProbeConvergenceWarning(UserWarning):
    """A probe's L-BFGS stopped above its tolerance at a strength the probe uses (the chosen C or the refit)."""


class LinearProbe:
    """Multinomial logistic regression on pooled features, L2 strength chosen by grouped CV log loss.

    What is fitted and chosen is scikit-learn's ``LogisticRegressionCV(Cs, cv=StratifiedGroupKFold splits,
    scoring="neg_log_loss")`` with lbfgs: for each C, ``C * sum(log loss) + ||W||^2 / 2`` on standardised features
    (intercept not penalised; one logit with two classes); C chosen by the mean held-out log loss over the inner
    folds (the first of equal ones); then a refit on all rows at that C, started from the folds' mean solution.

    The solver is L-BFGS in torch on ``device`` (None: the CPU), on the features rotated into the eigenbasis of their
    covariance, each coordinate scaled by its curvature (``_Logistic``); its matmuls are float32 on the CPU, float64
    on other devices, all else float64. It stops at scikit-learn's tolerance ``tol`` on the inner folds and at a
    tenth of it on the refit (``REFIT_TOL``); a refit that float32's rounding stops short finishes in float64. The inner folds are one batched problem per C (``batch_folds``; False
    solves them one at a time). Strengths go strongest first, each C starting from the previous solutions
    extrapolated along the path, with L-BFGS's curvature pairs carried over. ``warm_start`` (another
    fitted probe on the same classes and features, e.g. the previous outer fold's), re-expressed on this fit's
    standardised features, replaces the path's start at its C and the refit's start, each where its objective is
    lower (measured on a cross-fit: the path's own starts were closer, 5-9 iterations against 16-18 from the previous
    outer fold's probe, so a warm start only helps where it is nearly this fit's solution).

    After ``fit``: ``coef_`` [num_classes, D] and ``intercept_`` [num_classes] act on raw (unstandardised) features,
    in the timm classifier's layout; ``C_`` the chosen strength, ``cv_log_loss_`` its mean inner-CV log loss (NaN
    when a class is too rare to cross-validate: then C is 1), ``cv_log_losses_`` the mean for each of ``Cs``;
    ``classes_`` the classes present in training; ``standardised_coef_`` [L, D] and ``standardised_intercept_`` [L]
    the solution on standardised features (``mean_``, ``scale_``; L = 1 with two classes); ``n_iter_`` the refit's
    L-BFGS iterations and ``cv_n_iter_`` [folds, Cs] the path's.
    """

    def __init__(self, Cs: Sequence[float] = DEFAULT_CS, cv: int = 5, max_iter: int = 2000, seed: int = 0,
                 device: str | torch.device | None = None, tol: float = DEFAULT_TOL, batch_folds: bool = True):
        self.Cs, self.cv, self.max_iter, self.seed, self.device = Cs, cv, max_iter, seed, device
        self.tol, self.batch_folds = tol, batch_folds

    def fit(self, features: np.ndarray, labels: np.ndarray, num_classes: int, groups: np.ndarray | None = None,
            warm_start: LinearProbe | None = None) -> LinearProbe:
        """Fit on ``features`` [N, D] and ``labels`` [N] (classes 0..num_classes - 1); ``groups`` [N]: rows of one
        group (views of one image) stay in one inner fold; ``warm_start``: a fitted probe to start from."""
        x, y = np.asarray(features, dtype=np.float64), np.asarray(labels, dtype=np.int64)
        if x.ndim != 2 or y.ndim != 1 or len(x) != len(y):
            raise ValueError(f"features: expected [N, D] with one label per row, got {x.shape} and {y.shape} labels")
        if groups is not None and np.shape(groups) != y.shape:
            raise ValueError(f"groups: expected one group per row, shape {y.shape}, got {np.shape(groups)}")
        if len(y) and (y.min() < 0 or y.max() >= num_classes):
            raise ValueError(f"labels: expected classes 0..{num_classes - 1}, got {y.min()}..{y.max()}")
        self._check_params()
        present = np.unique(y)
        if len(present) < 2:
            got = f"only class {int(present[0])}" if len(present) else "no rows"
            raise UserInputError(f"a linear probe needs train images of at least 2 classes, got {got}")
        device = torch.device("cpu") if self.device is None else torch.device(self.device)
        self.mean_ = x.mean(0)
        self.scale_ = x.std(0)
        self.scale_[self.scale_ < 1e-12] = 1.0  # a constant feature (dead channel) carries nothing; keep it finite
        self.classes_, self.num_classes_ = present, num_classes
        logits = 1 if len(present) == 2 else len(present)  # two classes: scikit-learn's binomial, one logit
        with torch.no_grad():
            # float32 rotated features on the CPU: the matmuls 3x faster, and the features came as float32 anyway; on
            # CUDA float32 matmuls may be TF32 (a global switch), and float64 is fast enough there.
            basis = _Eigenbasis(torch.from_numpy((x - self.mean_) / self.scale_).to(device),
                                torch.float32 if device.type == "cpu" else torch.float64)
            target = torch.from_numpy(np.searchsorted(present, y)).to(device)
            start = None if warm_start is None else self._warm_start(warm_start, logits, basis)
            splits = self._splits(y, groups)
            everything = torch.full((1, len(y)), 1.0 / len(y), dtype=torch.float64, device=device)
            refit = _Logistic(basis, target, everything, logits)
            if splits is None:  # a class too rare for even 2 folds: no CV, a moderate fixed strength
                self.C_, self.cv_log_loss_ = 1.0, float("nan")
                self.cv_log_losses_, self.cv_n_iter_ = np.full(len(self.Cs), np.nan), np.zeros((0, len(self.Cs)), int)
                theta = torch.zeros(1, refit.size, dtype=torch.float64, device=device)
            else:
                theta = self._cv_path(basis, target, logits, splits, start).reshape(1, -1)
            penalty = torch.tensor([1.0 / (self.C_ * len(y))], dtype=torch.float64, device=device)
            if start is not None:
                theta = refit.lower(theta, start.theta.reshape(1, -1), penalty)
            theta, result, _ = _solve(refit, penalty, theta, self.tol * REFIT_TOL, self.max_iter)
            n_iter = int(result.n_iter[0])
            if result.line_search_failed[0] and not result.converged[0] and basis.features.dtype != torch.float64:
                # float32's rounding is the floor the line search met: finish in float64
                refit = _Logistic(basis.in_float64(), target, everything, logits)
                theta, result, _ = _solve(refit, penalty, theta, self.tol * REFIT_TOL, max(1, self.max_iter - n_iter))
                n_iter += int(result.n_iter[0])
            theta = basis.to_standardised(theta.reshape(-1, logits)).cpu().numpy()
        if not result.converged[0]:
            warnings.warn(ProbeConvergenceWarning(f"linear probe: the refit at C={self.C_:.3g} stopped "
                                                  f"{result.why(0, self.tol * REFIT_TOL)}; its coefficients are approximate"))
        self.standardised_coef_, self.standardised_intercept_ = theta[:-1].T.copy(), theta[-1].copy()
        self.n_iter_ = n_iter
        self._set_head()
        return self

    def _check_params(self) -> None:
        Cs = np.asarray(self.Cs, dtype=np.float64)
        if Cs.ndim != 1 or len(Cs) == 0 or not np.all(np.isfinite(Cs) & (Cs > 0)):
            raise ValueError(f"Cs: expected a non-empty sequence of positive strengths, got {self.Cs!r}")
        for name, low in (("cv", 2), ("max_iter", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
                raise ValueError(f"{name}: expected an integer of at least {low}, got {value!r}")
        if isinstance(self.tol, bool) or not isinstance(self.tol, (int, float)) or not self.tol > 0:
            raise ValueError(f"tol: expected a positive number, got {self.tol!r}")

    def _splits(self, y: np.ndarray, groups: np.ndarray | None):
        # Imported here: scikit-learn takes about a second, and every fine-tune imports this module (LP-FT) fitting or not.
        from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

        groups = np.arange(len(y)) if groups is None else np.asarray(groups)
        per_class = [len(np.unique(groups[y == c])) for c in np.unique(y)]
        folds = min(self.cv, min(per_class))
        if folds < 2:
            return None
        if len(np.unique(groups)) == len(y):  # a row per group: plain stratified folds (the group splitter's greedy
            # search over 2,599 one-row groups took 0.3 s, a fifth of the whole fit)
            return list(StratifiedKFold(n_splits=folds, shuffle=True, random_state=self.seed).split(y, y))
        return list(StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=self.seed).split(y, y, groups))

    def _cv_path(self, basis: _Eigenbasis, target: torch.Tensor, logits: int, splits, start: _Start | None) -> torch.Tensor:
        """Fit every inner fold at every C and choose C (``C_``, ``cv_log_loss_``, ``cv_log_losses_``, ``cv_n_iter_``);
        returns the folds' mean solution at the chosen C, the refit's start."""
        Cs, folds, n = np.asarray(self.Cs, dtype=np.float64), len(splits), len(target)
        device = target.device
        train = torch.zeros(folds, n, dtype=torch.float64, device=device)  # each row's weight in each fold's mean loss
        test = torch.zeros_like(train)
        for k, (fit_rows, held_rows) in enumerate(splits):
            train[k, torch.from_numpy(fit_rows).to(device)] = 1.0 / len(fit_rows)
            test[k, torch.from_numpy(held_rows).to(device)] = 1.0 / len(held_rows)
        train_rows = torch.tensor([len(f) for f, _ in splits], dtype=torch.float64, device=device)
        order = np.argsort(Cs, kind="stable")  # strongest first
        warm_at = None if start is None else order[np.argmin(np.abs(np.log(Cs[order] / start.C)))]
        losses = np.full((folds, len(Cs)), np.nan)
        converged = np.zeros((folds, len(Cs)), bool)
        self.cv_n_iter_ = np.zeros((folds, len(Cs)), int)
        sums = {}  # the folds' summed solutions at each C
        for batch in ([list(range(folds))] if self.batch_folds else [[k] for k in range(folds)]):
            problem = _Logistic(basis, target, train[batch], logits)
            theta, path, carried = torch.zeros(len(batch), problem.size, dtype=torch.float64, device=device), [], None
            for i in order:
                if len(path) >= 2:  # the solutions so far, extrapolated linearly in log C
                    step = np.log(Cs[i] / Cs[path[-1][0]]) / np.log(Cs[path[-1][0]] / Cs[path[-2][0]])
                    theta = path[-1][1] + float(step) * (path[-1][1] - path[-2][1])
                penalty = 1.0 / (Cs[i] * train_rows[batch])
                if i == warm_at:
                    theta = problem.lower(theta, start.theta.reshape(1, -1).expand(len(batch), -1), penalty)
                theta, result, carried = _solve(problem, penalty, theta, self.tol, self.max_iter, carried)
                losses[batch, i] = problem.held_out_log_loss(theta, test[batch]).cpu().numpy()
                converged[batch, i], self.cv_n_iter_[batch, i] = result.converged, result.n_iter
                sums[i] = sums.get(i, 0.0) + theta.sum(0)
                path.append((i, theta))
        self.cv_log_losses_ = losses.mean(0)
        best = int(np.argmin(self.cv_log_losses_))  # the first of equal ones, as LogisticRegressionCV's argmax
        self.C_, self.cv_log_loss_ = float(Cs[best]), float(self.cv_log_losses_[best])
        if not converged[:, best].all():
            stopped = ", ".join(str(k + 1) for k in np.flatnonzero(~converged[:, best]))
            warnings.warn(ProbeConvergenceWarning(
                f"linear probe: at the chosen C={self.C_:.3g}, inner fold(s) {stopped} stopped above tol {self.tol:g} "
                f"(max_iter {self.max_iter} or a failed line search); the CV log loss is approximate"))
        return sums[best] / folds

    def _warm_start(self, probe: LinearProbe, logits: int, basis: _Eigenbasis) -> _Start:
        """``probe``'s solution re-expressed on this fit's standardised features, in ``basis``."""
        d = len(self.mean_)
        if not isinstance(probe, LinearProbe) or not hasattr(probe, "coef_"):
            raise ValueError(f"warm_start: expected a fitted LinearProbe, got {type(probe).__name__}")
        if probe.coef_.shape != (self.num_classes_, d):
            raise ValueError(f"warm_start: expected a probe of {self.num_classes_} classes on {d} features, "
                             f"got coefficients of shape {probe.coef_.shape}")
        coef, intercept = probe.coef_[self.classes_], probe.intercept_[self.classes_]
        unseen = ~np.isin(self.classes_, probe.classes_)  # its ~-50 logit for a class it never saw is no start
        coef[unseen], intercept[unseen] = 0.0, intercept[~unseen].mean()
        weight, bias = coef * self.scale_, intercept + coef @ self.mean_  # logits of z, since x = z * scale + mean
        if logits == 1:  # the log-odds of the second class
            weight, bias = weight[1:] - weight[:1], bias[1:] - bias[:1]
        theta = torch.from_numpy(np.vstack([weight.T, bias[None]])).to(basis.features.device)
        return _Start(basis.from_standardised(theta), float(probe.C_))

    def _set_head(self) -> None:
        """``coef_``, ``intercept_``: the standardised solution on raw features, one row per class (timm's layout)."""
        coef, intercept = self.standardised_coef_, self.standardised_intercept_
        if len(self.classes_) == 2:  # one logit, the log-odds of the second class
            coef, intercept = np.vstack([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
        weight = np.zeros((self.num_classes_, len(self.mean_)))
        bias = np.full(self.num_classes_, float(intercept.min()) - 50.0)  # a class absent from training: ~e^-50 of the rest
        weight[self.classes_] = coef / self.scale_
        bias[self.classes_] = intercept - (coef / self.scale_) @ self.mean_
        self.coef_, self.intercept_ = weight, bias

    def logits(self, features: np.ndarray) -> np.ndarray:
        return (np.asarray(features, dtype=np.float64) @ self.coef_.T + self.intercept_).astype(np.float32)

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        """The fit's own probabilities, one column per class (0 for classes absent from training)."""
        z = (np.asarray(features, np.float64) - self.mean_) / self.scale_
        scores = torch.from_numpy(z @ self.standardised_coef_.T + self.standardised_intercept_)
        if len(self.classes_) == 2:
            second = torch.sigmoid(scores[:, 0])
            fitted = torch.stack([1.0 - second, second], 1)
        else:
            fitted = torch.softmax(scores, 1)
        p = np.zeros((len(z), self.num_classes_))
        p[:, self.classes_] = fitted.numpy()
        return p


class _Eigenbasis:
    """Standardised features ``z`` in the eigenbasis of their covariance (float64), without its null space.

    A rotation leaves the L2 penalty unchanged, and a weight along a direction no row varies in only adds penalty
    (so it is 0): the fit in this basis is the fit on ``z``, with at most min(N, D) weights per logit. ``variance``
    (the eigenvalues, each feature's mean square here) scales L-BFGS's coordinates (``_Logistic``).
    """

    def __init__(self, z: torch.Tensor, dtype: torch.dtype):
        n, d = z.shape
        if n >= d:
            # In the solver's float32 on the CPU: the covariance and its eigh take half float64's time (0.25 s of a
            # 1.3 s fit at 2,599 x 1,280), and the basis only has to be orthonormal to the float32 the features get.
            low = z.to(dtype)
            variance, vectors = torch.linalg.eigh(low.T @ low / n)
            variance, vectors = variance.to(torch.float64), vectors.to(torch.float64)
            kept = variance > variance.max() * NULL_SPACE
            self.variance, self.vectors = variance[kept], vectors[:, kept]
        else:  # the rows' Gram matrix is the smaller one: z = U sqrt(n variance) V^T
            variance, u = torch.linalg.eigh(z @ z.T / n)
            kept = variance > variance.max() * NULL_SPACE
            self.variance = variance[kept]
            self.vectors = z.T @ u[:, kept] / (n * self.variance).sqrt()
        self.z = z
        self.features = z.to(dtype) @ self.vectors.to(dtype)  # [N, R], in the dtype of the solver's matmuls

    def in_float64(self) -> _Eigenbasis:
        """This basis with float64 features."""
        other = copy.copy(self)
        other.features = self.z @ self.vectors
        return other

    def to_standardised(self, theta: torch.Tensor) -> torch.Tensor:
        """[R + 1, L] (weights in this basis, then intercepts) -> [D + 1, L] on the standardised features."""
        return torch.cat([self.vectors @ theta[:-1], theta[-1:]])

    def from_standardised(self, theta: torch.Tensor) -> torch.Tensor:
        """[D + 1, L] -> [R + 1, L]; exact for weights in the span of the rows."""
        return torch.cat([self.vectors.T @ theta[:-1], theta[-1:]])


@dataclass
class _Start:
    theta: torch.Tensor  # [R + 1, logits] in the fit's eigenbasis
    C: float  # the strength it was fitted at: the path tries it there


class _Logistic:
    """K L2-regularised logistic regressions on rows of one feature matrix, evaluated together.

    Problem k weighs row i by ``row_weight[k, i]`` (1/n_k on its n_k rows, 0 elsewhere), so its objective is
    scikit-learn's ``C * sum(log loss) + ||W||^2 / 2`` divided by ``C * n_k``: the mean log loss plus
    ``penalty_k / 2 * ||W||^2`` with ``penalty_k = 1 / (C n_k)``. scikit-learn's lbfgs minimises the same scaled
    function, so a gradient tolerance means the same in both. The intercept is not penalised. Parameters ``theta``
    are flat [K, (R + 1) * logits]: weights [R, logits], then intercepts. All K problems' scores are one matmul of the
    features with [R, K * logits], and their gradients another, in the features' dtype (float32 on the CPU; all else
    is float64): the features are read once for all K.

    L-BFGS works on ``u = theta * scaling``: with eigenbasis features (``variance`` each) the loss's curvature along
    a weight is about ``CURVATURE * variance + penalty`` while the fit is unsure, so its square root makes the
    curvature about 1 along every coordinate (measured: 4x fewer iterations on CNN-like features).
    """

    def __init__(self, basis: _Eigenbasis, target: torch.Tensor, row_weight: torch.Tensor, logits: int):
        features, variance = basis.features, basis.variance
        self.features, self.vectors = features, basis.vectors.to(features.dtype)
        self.target, self.row_weight, self.logits = target, row_weight, logits
        self.shape = (features.shape[1] + 1, logits)
        self.size = self.shape[0] * logits
        penalised = torch.ones(self.shape, dtype=torch.float64, device=features.device)
        penalised[-1] = 0.0
        self.penalised = penalised.reshape(-1)
        curvature = torch.ones(self.shape, dtype=torch.float64, device=features.device)  # the intercepts': unscaled
        curvature[:-1] = CURVATURE * variance[:, None]
        self.curvature = curvature.reshape(-1)

    def scaling(self, penalty: torch.Tensor) -> torch.Tensor:
        """[K, size]: u = theta * scaling for the problems at ``penalty`` [K]."""
        return (self.curvature + penalty[:, None] * self.penalised).sqrt()

    def gradient_max(self, grad: torch.Tensor) -> torch.Tensor:
        """[k]: the largest entry of each gradient [k, size] (in theta) on the standardised features, where
        scikit-learn measures its tolerance: the weights' part rotated back out of the eigenbasis."""
        k, (r1, c) = len(grad), self.shape
        g = grad.reshape(k, r1, c)
        weights = self.vectors @ g[:, :-1].transpose(0, 1).reshape(r1 - 1, k * c).to(self.vectors.dtype)
        return torch.maximum(weights.abs().reshape(-1, k, c).amax((0, 2)).to(torch.float64), g[:, -1].abs().amax(1))

    def above(self, grad: torch.Tensor, tol: float) -> torch.Tensor:
        """[k] bool: ``gradient_max(grad) > tol``, without the rotation where the norm decides (a vector's largest
        entry lies between its norm / sqrt(its length) and its norm; the rotation keeps the norm)."""
        norm = grad.norm(dim=1)
        above = norm > tol
        unsure = above & (norm <= tol * math.sqrt(len(self.vectors) + 1) * math.sqrt(self.logits))
        if unsure.any():
            above[unsure] = self.gradient_max(grad[unsure]) > tol
        return above

    def scores(self, theta: torch.Tensor) -> torch.Tensor:
        """[k, logits, N] (float64) for parameters [k, size]: rows last, so each problem's logits are contiguous rows
        (torch's softmax over a short last axis is 3x slower) and the gradient is one matmul with no transpose."""
        k, (r1, c) = len(theta), self.shape
        theta = theta.reshape(k, r1, c)
        w = theta[:, :-1].transpose(1, 2).reshape(k * c, r1 - 1).to(self.features.dtype)
        # features @ w.T, then transposed: BLAS is 2x slower the other way round ([k * c, R] @ [R, N])
        return (self.features @ w.T).T.to(torch.float64).reshape(k, c, -1) + theta[:, -1, :, None]

    def objective(self, penalty: torch.Tensor, scaling: torch.Tensor):
        """``f(u, problems) -> (loss [k], gradient [k, size])`` of ``problems`` (indices into the K) at ``penalty``,
        in the coordinates ``u = theta * scaling``."""

        def f(u: torch.Tensor, problems: torch.Tensor):
            k, (r1, c) = len(u), self.shape
            theta = u / scaling[problems]
            s = self.scores(theta)  # [k, c, N]
            target = self.target.expand(k, -1)
            if c == 1:
                y = target.to(torch.float64)
                per_row = torch.nn.functional.softplus(s[:, 0]) - y * s[:, 0]
                ds = torch.sigmoid(s) - y[:, None]
            else:
                log_p = torch.log_softmax(s, 1)
                per_row = -log_p.gather(1, target[:, None])[:, 0]
                ds = log_p.exp_().scatter_add_(1, target[:, None], -torch.ones_like(log_p[:, :1]))
            row_weight = self.row_weight[problems]
            ds *= row_weight[:, None]
            grad = torch.empty(k, r1, c, dtype=torch.float64, device=u.device)
            flat_ds = ds.reshape(k * c, -1).to(self.features.dtype)
            grad[:, :-1] = (flat_ds @ self.features).to(torch.float64).reshape(k, c, r1 - 1).transpose(1, 2)
            grad[:, -1] = ds.sum(2)
            pen = penalty[problems]
            grad = (grad.reshape(k, -1) + pen[:, None] * theta * self.penalised) / scaling[problems]
            loss = (per_row * row_weight).sum(1) + 0.5 * pen * (theta.square() * self.penalised).sum(1)
            return loss, grad

        return f

    def carry_pairs(self, pairs: list, taken_at: tuple, now: tuple) -> list:
        """Curvature pairs (s, y) taken at ``taken_at`` = (penalty, scaling), as exact pairs at ``now``: the two
        objectives differ by the quadratic penalty alone, so y gains the penalty's change times s (in theta)."""
        (old_penalty, old_scaling), (new_penalty, new_scaling) = taken_at, now
        carried = []
        for s, y in pairs:
            s_theta = s / old_scaling
            y_theta = y * old_scaling + (new_penalty - old_penalty)[:, None] * s_theta * self.penalised
            carried.append((s_theta * new_scaling, y_theta / new_scaling))
        return carried

    def lower(self, theta: torch.Tensor, other: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
        """Per problem, whichever of two starts [K, size] has the lower objective at ``penalty``."""
        everyone = torch.arange(len(theta), device=theta.device)
        f = self.objective(penalty, torch.ones_like(theta))
        return torch.where((f(other, everyone)[0] < f(theta, everyone)[0])[:, None], other, theta)

    def held_out_log_loss(self, theta: torch.Tensor, test_weight: torch.Tensor) -> torch.Tensor:
        """[k]: scikit-learn's log_loss (probabilities clipped to [eps, 1 - eps]) of each problem's held-out rows."""
        s = self.scores(theta)
        if self.logits == 1:
            second = torch.sigmoid(s[:, 0])
            p = torch.where(self.target.bool(), second, 1.0 - second)
        else:
            p = torch.softmax(s, 1).gather(1, self.target.expand(len(theta), -1)[:, None])[:, 0]
        return -(torch.log(p.clamp(EPS, 1.0 - EPS)) * test_weight).sum(1)


def _solve(problem: _Logistic, penalty: torch.Tensor, theta: torch.Tensor, tol: float, max_iter: int, carried=None):
    """L-BFGS on ``problem`` at ``penalty`` [K] from ``theta`` [K, size]; ``carried``: the previous solve's pairs and
    where they were taken. Returns the solution, the ``_LbfgsResult`` and this solve's pairs for the next."""
    scaling = problem.scaling(penalty)
    pairs = None if carried is None else problem.carry_pairs(*carried, (penalty, scaling))

    def small(grad: torch.Tensor, problems: torch.Tensor) -> torch.Tensor:  # on the gradient in theta, as scikit-learn
        return ~problem.above(grad * scaling[problems], tol)

    result = _lbfgs(problem.objective(penalty, scaling), theta * scaling, max_iter, pairs, small)
    result.grad_max = problem.gradient_max(result.grad * scaling).cpu().numpy()
    return result.x / scaling, result, (result.pairs, (penalty, scaling))


@dataclass
class _LbfgsResult:
    x: torch.Tensor  # [K, size]
    grad: torch.Tensor  # [K, size] at x
    n_iter: np.ndarray  # [K]
    converged: np.ndarray  # [K] bool: the gradient is small
    line_search_failed: np.ndarray  # [K] bool
    pairs: list  # the curvature pairs (s, y), oldest first
    grad_max: np.ndarray | None = None  # [K]: the largest gradient entry, for messages (``_solve``)

    def why(self, k: int, tol: float) -> str:
        reason = "after a failed line search" if self.line_search_failed[k] else f"at max_iter ({self.n_iter[k]} iterations)"
        return f"{reason} with max |gradient| {self.grad_max[k]:.2g}, above tol {tol:g}"


def _lbfgs(f, x: torch.Tensor, max_iter: int, pairs: list | None, small) -> _LbfgsResult:
    """Minimise K independent smooth convex functions, ``f(x [k, size], problems) -> (loss [k], gradient [k, size])``,
    by L-BFGS with a backtracking (Armijo) line search, each problem with its own history and step.

    A problem stops once ``small(gradient [k, size], problems) -> [k] bool`` says so, after ``max_iter`` iterations,
    or when no step along its direction decreases the loss; the others go on, and only they are evaluated.
    ``pairs`` (s, y) start the history.
    """
    k_all = len(x)
    x = x.clone()
    loss, grad = f(x, torch.arange(k_all, device=x.device))
    history = [_pair(s, y) for s, y in pairs or []]  # (s, y, rho); rho 0 where a problem has no pair in that slot
    n_iter = torch.zeros(k_all, dtype=torch.int64, device=x.device)
    failed = torch.zeros(k_all, dtype=torch.bool, device=x.device)
    while True:
        if not (torch.isfinite(loss).all() and torch.isfinite(grad).all()):
            raise FloatingPointError("linear probe: the loss or its gradient became NaN or infinite")
        going = (~failed & (n_iter < max_iter)).nonzero()[:, 0]
        problems = going[~small(grad[going], going)]
        if len(problems) == 0:
            break
        g = grad[problems]
        everyone_going = len(problems) == k_all  # the common case: the history as it is, not a copy of it
        direction = -_two_loop(g, history if everyone_going else [(s[problems], y[problems], rho[problems])
                                                                   for s, y, rho in history])
        slope = (g * direction).sum(1)
        uphill = ~(slope < 0)  # a history gone wrong (rounding): fall back to the gradient
        if uphill.any():
            direction[uphill] = -g[uphill] / g[uphill].norm(dim=1, keepdim=True)
            slope = (g * direction).sum(1)
        step = torch.ones(len(problems), dtype=x.dtype, device=x.device)
        new_x, new_loss, new_grad = x[problems].clone(), loss[problems].clone(), g.clone()
        moved = torch.zeros(len(problems), dtype=torch.bool, device=x.device)
        pending = torch.arange(len(problems), device=x.device)
        for _ in range(MAX_HALVINGS):
            trial = x[problems[pending]] + step[pending, None] * direction[pending]
            trial_loss, trial_grad = f(trial, problems[pending])
            ok = torch.isfinite(trial_loss) & (trial_loss <= loss[problems[pending]] + ARMIJO * step[pending] * slope[pending])
            taken = pending[ok]
            new_x[taken], new_loss[taken], new_grad[taken], moved[taken] = trial[ok], trial_loss[ok], trial_grad[ok], True
            pending = pending[~ok]
            if len(pending) == 0:
                break
            step[pending] *= 0.5
        failed[problems[pending]] = True
        s_all, y_all = torch.zeros_like(x), torch.zeros_like(x)
        s_all[problems] = torch.where(moved[:, None], new_x - x[problems], 0.0)
        y_all[problems] = torch.where(moved[:, None], new_grad - g, 0.0)
        history = (history + [_pair(s_all, y_all)])[-LBFGS_MEMORY:]
        x[problems], loss[problems], grad[problems] = new_x, new_loss, new_grad
        n_iter[problems] += moved.to(n_iter.dtype)
    everyone = torch.arange(k_all, device=x.device)
    return _LbfgsResult(x, grad, n_iter.cpu().numpy(), small(grad, everyone).cpu().numpy(), failed.cpu().numpy(),
                        [(s, y) for s, y, _ in history])


def _pair(s: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A curvature pair with its rho = 1 / s.y, 0 (no pair) where s.y is not clearly positive."""
    sy = (s * y).sum(1)
    good = sy > 1e-12 * s.norm(dim=1) * y.norm(dim=1)
    return s, y, torch.where(good, 1.0 / torch.where(good, sy, 1.0), 0.0)


def _two_loop(g: torch.Tensor, history: list) -> torch.Tensor:
    """L-BFGS's two-loop recursion, each row with its own history: ``H g`` for the inverse-Hessian estimate H."""
    q, alphas = g.clone(), []
    for s, y, rho in reversed(history):
        alpha = rho * (s * q).sum(1)
        q -= alpha[:, None] * y
        alphas.append(alpha)
    # The initial scale: s.y / y.y of each row's newest pair, or a unit-length first step.
    gamma = 1.0 / g.norm(dim=1).clamp_min(1e-300)
    for s, y, rho in history:  # oldest to newest: the newest pair wins
        gamma = torch.where(rho > 0, (s * y).sum(1) / y.square().sum(1).clamp_min(1e-300), gamma)
    r = gamma[:, None] * q
    for (s, y, rho), alpha in zip(history, reversed(alphas)):
        beta = rho * (y * r).sum(1)
        r += (alpha - beta)[:, None] * s
    return r


def linear_head(model: torch.nn.Module) -> torch.nn.Linear | None:
    """The model's classifier (``get_classifier()``) when it is one Linear layer with a bias, else None."""
    head = model.get_classifier()
    return head if isinstance(head, torch.nn.Linear) and head.bias is not None else None


def classifier_linear(model: torch.nn.Module, backbone: str) -> torch.nn.Linear:
    """The model's final Linear (``get_classifier()``); refuses heads that are not one Linear layer."""
    head = linear_head(model)
    if head is None:
        raise UserInputError(f"{backbone}: its classifier (get_classifier()) is {type(model.get_classifier()).__name__}, "
                             "not one Linear layer "
                             "with a bias; --linear-probe and --head-init probe need such a head: choose another backbone")
    return head


def set_head(model: torch.nn.Module, probe: LinearProbe, backbone: str, scale: float = 1.0) -> None:
    """Copy the probe's weights, times ``scale``, into the timm classifier."""
    head = classifier_linear(model, backbone)
    if tuple(head.weight.shape) != probe.coef_.shape:
        raise ValueError(f"probe: coefficients {probe.coef_.shape} do not fit the classifier {tuple(head.weight.shape)}")
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(probe.coef_ * scale).to(head.weight))
        head.bias.copy_(torch.from_numpy(probe.intercept_ * scale).to(head.bias))


class PooledFeatures(torch.nn.Module):
    """``model`` up to the input of its final Linear: what a probe is fitted on."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(self.model.forward_features(images), pre_logits=True).flatten(1)


def pooled_features(model: torch.nn.Module, samples: Sequence[Sample], transform, hardware: Hardware, *,
                    batch_size: int = 64, workers: int = 0, desc: str = "features") -> np.ndarray:
    """[N, D] float32: ``forward_head(forward_features(x), pre_logits=True)`` of each sample, in order; its
    progress shown as ``desc`` (``zoo.progress``: a bar on a terminal, a line per tenth in a log)."""
    if not samples:
        return np.zeros((0, 0), np.float32)
    loader = loaders.eval_loader(samples, transform, batch_size=batch_size, workers=workers,
                                 pin_memory=hardware.device.type == "cuda")
    with progress(len(loader), desc, unit="batches") as bar:
        features, _ = predict_logits(PooledFeatures(model), loader, hardware, progress=bar)  # the prediction loop, on features
    return features


@dataclass
class TrainFeatures:
    """The train rows a probe is fitted on: center crops, then ``views`` augmented copies of each image."""

    features: np.ndarray
    labels: np.ndarray
    groups: np.ndarray  # the image each row comes from (keeps its views in one CV fold)


def train_features(model, samples: Sequence[Sample], dcfg: dict, cfg: FinetuneConfig, hardware: Hardware, workers: int,
                   center: np.ndarray | None = None) -> TrainFeatures:
    """Center-crop features (``center`` if already extracted) plus ``cfg.probe_views`` augmented views per image."""
    n = len(samples)
    parts = [center if center is not None else pooled_features(model, samples, loaders.eval_transform(dcfg), hardware,
                                                               batch_size=cfg.batch_size, workers=workers,
                                                               desc="features of the train images")]
    if cfg.probe_views:
        seed_everything(cfg.seed)  # the views' random crops and flips are part of the result: make them reproducible
        augment = loaders.train_transform(dcfg, auto_augment=cfg.auto_augment, crop_scale=cfg.crop_scale, hflip=cfg.hflip)
        for view in range(1, cfg.probe_views + 1):
            parts.append(pooled_features(model, samples, augment, hardware, batch_size=cfg.batch_size, workers=workers,
                                         desc=f"features of augmented view {view}/{cfg.probe_views}"))
    labels = np.array([s.label for s in samples], dtype=np.int64)
    return TrainFeatures(np.concatenate(parts), np.tile(labels, len(parts)), np.tile(np.arange(n), len(parts)))


def fit_probe(train: TrainFeatures, num_classes: int, seed: int, device: str | torch.device | None = None,
              warm_start: LinearProbe | None = None) -> LinearProbe:
    return LinearProbe(seed=seed, device=device).fit(train.features, train.labels, num_classes, groups=train.groups,
                                                     warm_start=warm_start)
