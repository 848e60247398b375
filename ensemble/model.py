"""The fitted ensemble: what ``zoo ensemble fit`` learns and the ensemble file stores."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Sequence

import numpy as np

from ensemble.calibration import apply_temperature
from ensemble.combine import combine


@dataclass
class Member:
    name: str
    backbone: str
    weight: float
    temperature: float = 1.0
    run: str | None = None  # absolute path of the member's run directory, when known
    predictions: str | None = None  # absolute path of the validation prediction file it was fitted on
    scores: dict[str, float] = field(default_factory=dict)  # its validation scores, at its temperature
    tta: int = 1  # test-time augmentation views of the predictions its temperature (and the weights) were fitted on


@dataclass
class Ensemble:
    """A fitted ensemble. ``predict_log_proba`` applies it to member log-probabilities
    given in ``members`` order.

    For the weighted methods each member's log-probabilities are divided by its
    temperature, combined with ``weights`` by the ``combine`` rule, then divided by
    ``final_temperature``. For ``stacking``, ``stacking`` holds the logistic regression
    (``coef`` [C, M*C], ``intercept`` [C], ``clip``) and temperatures are 1.
    """

    classes: list[str]
    members: list[Member]
    method: str = "slsqp"
    metric: str = "log_loss"
    combine: str = "arithmetic"
    calibrate: bool = True
    final_temperature: float = 1.0
    stacking: dict[str, Any] | None = None
    options: dict[str, Any] = field(default_factory=dict)
    scores: dict[str, Any] = field(default_factory=dict)
    dropped: list[Member] = field(default_factory=list)  # zero-weight members: scores only, never applied
    warnings: list[str] = field(default_factory=list)

    @property
    def calibrated(self) -> bool:
        """Whether a temperature other than 1 is applied (to a member or to the blend)."""
        return self.final_temperature != 1.0 or any(m.temperature != 1.0 for m in self.members)

    def tta_mismatches(self, member_tta: Sequence[int]) -> list[str]:
        """A warning for each member whose predictions use other TTA views than those its temperature was fitted on.

        TTA averages probabilities over views, which softens them: a temperature fitted on
        single-view predictions then over-sharpens or under-sharpens the blend.
        """
        if not self.calibrated:
            return []
        return [f"member {m.name}: temperatures were fitted on predictions with tta={m.tta} and are applied to tta={t}; "
                f"fit the ensemble on `zoo predict RUN --split run-val --tta {t}` predictions of each member"
                for m, t in zip(self.members, member_tta) if int(t) != m.tta]

    @property
    def weights(self) -> np.ndarray:
        return np.array([m.weight for m in self.members], dtype=np.float64)

    @property
    def temperatures(self) -> np.ndarray:
        return np.array([m.temperature for m in self.members], dtype=np.float64)

    def without_zero_weights(self) -> "Ensemble":
        """A copy without members of weight 0 (a stacking ensemble needs every member)."""
        if self.stacking is not None or all(m.weight > 0 for m in self.members):
            return self
        kept = [m for m in self.members if m.weight > 0]
        return replace(self, members=kept, dropped=self.dropped + [m for m in self.members if m.weight <= 0])

    def predict_log_proba(self, log_probs: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
        """Combined log-probabilities [N, C] from each member's logits or log-probabilities [N, C]."""
        if len(log_probs) != len(self.members):
            raise ValueError(f"log_probs: expected one array per member ({len(self.members)}), got {len(log_probs)}")
        shapes = {np.shape(lp) for lp in log_probs}
        if len(shapes) != 1 or len(next(iter(shapes))) != 2 or next(iter(shapes))[1] != len(self.classes):
            raise ValueError(f"log_probs: expected [N, {len(self.classes)}] arrays of one shape, got shapes {sorted(shapes)}")
        if self.stacking is not None:
            from ensemble.weights import StackingCombiner

            combiner = StackingCombiner.from_params(self.stacking["coef"], self.stacking["intercept"], self.stacking["clip"])
            stack = np.stack([apply_temperature(np.asarray(lp, dtype=np.float32), 1.0) for lp in log_probs])
            return combiner.predict_log_proba(stack)
        stack = np.stack([apply_temperature(np.asarray(lp, dtype=np.float32), m.temperature) for lp, m in zip(log_probs, self.members)])
        return apply_temperature(combine(stack, self.weights, self.combine), self.final_temperature)
