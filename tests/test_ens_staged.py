"""Staged calibration through the command line's default path: a member without information gets no weight."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from ensemble.fit import fit_ensemble, read_members
from ensemble.synthetic import synthetic_members, write_synthetic_runs
from zoo.cli import main


@pytest.mark.parametrize("seed", [0, 1])
def test_default_fit_gives_a_member_independent_of_the_labels_no_weight(tmp_path, seed):
    # Two good members and one whose logits are pure noise (signal 0): 4,000 rows, 10 classes.
    # The joint weights + final temperature fit gave the noise member 0.07..0.69 of the weight here.
    runs = write_synthetic_runs(tmp_path / "runs", synthetic_members(3, 4000, 10, signal=[2.0, 2.0, 0.0], seed=seed))
    out = tmp_path / "ens.json"
    result = CliRunner().invoke(main, ["ensemble", "fit", *map(str, runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    weights = {m["name"]: m["weight"] for m in data["members"]}
    weights.update({m["name"]: 0.0 for m in data.get("dropped") or []})
    assert weights["member_02"] <= 0.02, weights
    assert min(weights["member_00"], weights["member_01"]) > 0.3, weights
    # ... and the command names it: its temperature sits at the upper bound.
    assert "warning: member member_02: temperature 20.00 is at its upper bound (20): its predictions carry almost no " \
           "information about the labels" in result.output


def test_warns_naming_a_member_at_either_temperature_bound():
    members = synthetic_members(3, 600, 4, signal=[2.0, 0.0, 1.0], seed=0)
    y = members[0].labels
    members[2].logits = np.eye(4, dtype=np.float32)[y] * 8.0  # right on every row: wants T -> 0
    ens = fit_ensemble(members, cv=0)
    upper = [w for w in ens.warnings if w.startswith("member member_01: temperature 20.00 is at its upper bound")]
    lower = [w for w in ens.warnings if w.startswith("member member_02: temperature 0.05 is at its lower bound")]
    assert len(upper) == 1 and len(lower) == 1, ens.warnings
    assert not any(w.startswith("member member_00") for w in ens.warnings)


def test_read_members_stacks_files_one_at_a_time_and_aligns_them(tmp_path):
    members = synthetic_members(3, 50, 4, seed=2)
    members[1] = members[1].take(np.arange(50)[::-1])  # same rows, other order
    runs = write_synthetic_runs(tmp_path / "runs", members)
    stack = read_members([str(r) for r in runs])
    assert stack.log_probs.shape == (3, 50, 4) and stack.log_probs.dtype == np.float32
    np.testing.assert_allclose(np.exp(stack.log_probs).sum(axis=2), 1.0, rtol=1e-5)
    expected = members[1].take(np.arange(50)[::-1]).log_probabilities()
    np.testing.assert_allclose(stack.log_probs[1], expected, atol=1e-5)  # back in the first file's id order
    assert all(np.shares_memory(p.logits, stack.log_probs) for p in stack.preds)  # no second copy of the logits
    assert stack.preds[1].ids == members[0].ids
