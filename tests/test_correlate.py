import json
from dataclasses import replace

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.metrics import cohen_kappa_score

from ensemble.diversity import (PAIRWISE_MEASURES, DiversityInputs, correlate, get_measure, kuncheva_whitaker_kappa,
                                suggest_subset)
from ensemble.synthetic import synthetic_members, write_synthetic_runs
from zoo.cli import main
from zoo.errors import UserInputError
from zoo.predictions import write_predictions


def _pair(n=2000, c=5, seed=0):
    return synthetic_members(2, n, c, signal=1.5, shared=0.0, seed=seed)


def test_identical_files_correlate_perfectly():
    a = _pair()[0]
    b = replace(a, run="copy_of_a")
    r = correlate([a, b])
    m = r.matrices
    assert m["prob_corr"][0, 1] == pytest.approx(1.0, abs=1e-9)
    assert m["correct_corr"][0, 1] == pytest.approx(1.0, abs=1e-9)
    assert m["disagreement"][0, 1] == 0.0
    assert m["yule_q"][0, 1] == pytest.approx(1.0)
    assert m["cohen_kappa"][0, 1] == pytest.approx(1.0)
    assert m["double_fault"][0, 1] == pytest.approx(1.0 - r.models[0]["accuracy"])
    assert r.kappa == pytest.approx(1.0)


def test_independent_members_correlate_near_zero():
    # No shared noise and no signal: predictions independent of each other and of the labels.
    a, b = synthetic_members(2, 4000, 4, signal=0.0, shared=0.0, seed=1)
    r = correlate([a, b])
    # About 3 standard errors at N = 4000 (Yule's Q, a log-odds measure, varies most).
    for name, tol in (("prob_corr", 0.05), ("correct_corr", 0.05), ("yule_q", 0.15), ("cohen_kappa", 0.05)):
        assert abs(r.matrices[name][0, 1]) < tol, (name, r.matrices[name][0, 1])
    assert r.matrices["disagreement"][0, 1] == pytest.approx(0.75, abs=0.03)  # 1 - 1/C
    assert abs(r.kappa) < 0.08


def test_shared_noise_raises_correlation():
    low = correlate(synthetic_members(2, 2000, 5, signal=1.0, shared=0.1, seed=2)).matrices["prob_corr"][0, 1]
    high = correlate(synthetic_members(2, 2000, 5, signal=1.0, shared=0.9, seed=2)).matrices["prob_corr"][0, 1]
    assert high > low + 0.3


def test_measures_match_their_definitions():
    members = synthetic_members(3, 500, 4, signal=[0.5, 1.0, 1.5], shared=0.5, seed=3)
    x = DiversityInputs.from_predictions(members)
    r = correlate(members)
    y = members[0].labels
    for i, j in ((0, 1), (0, 2), (1, 2)):
        pi, pj = x.predicted[i], x.predicted[j]
        ri, rj = pi == y, pj == y
        n11, n00 = np.mean(ri & rj), np.mean(~ri & ~rj)
        n10, n01 = np.mean(ri & ~rj), np.mean(~ri & rj)
        assert r.matrices["prob_corr"][i, j] == pytest.approx(np.corrcoef(x.probs[i].ravel(), x.probs[j].ravel())[0, 1], abs=1e-6)
        assert r.matrices["correct_corr"][i, j] == pytest.approx(np.corrcoef(ri, rj)[0, 1], abs=1e-9)
        assert r.matrices["disagreement"][i, j] == pytest.approx(np.mean(pi != pj))
        assert r.matrices["double_fault"][i, j] == pytest.approx(n00)
        assert r.matrices["yule_q"][i, j] == pytest.approx((n11 * n00 - n01 * n10) / (n11 * n00 + n01 * n10))
        assert r.matrices["cohen_kappa"][i, j] == pytest.approx(cohen_kappa_score(pi, pj))
        for mat in r.matrices.values():
            assert mat[i, j] == mat[j, i]


def test_kuncheva_whitaker_kappa_by_hand_and_through_average_disagreement():
    correct = np.array([[1, 1, 0, 1], [1, 0, 0, 1], [0, 1, 0, 1]], dtype=bool)
    # l = [2, 2, 0, 3], L = 3, N = 4, p = 7/12
    p = 7 / 12
    expected = 1 - (1 / 3) * (2 * 1 + 2 * 1 + 0 + 0) / (4 * 2 * p * (1 - p))
    assert kuncheva_whitaker_kappa(correct) == pytest.approx(expected)
    # Kuncheva & Whitaker (2003): kappa = 1 - D_av / (2 p (1 - p)), D_av the mean pairwise disagreement of right/wrong.
    rng = np.random.default_rng(0)
    correct = rng.random((5, 300)) < np.array([[0.6], [0.7], [0.8], [0.75], [0.65]])
    pbar = correct.mean()
    d_av = np.mean([np.mean(correct[i] != correct[j]) for i in range(5) for j in range(i + 1, 5)])
    assert kuncheva_whitaker_kappa(correct) == pytest.approx(1 - d_av / (2 * pbar * (1 - pbar)))
    assert np.isnan(kuncheva_whitaker_kappa(np.ones((3, 5), dtype=bool)))


def test_suggested_subset_prefers_a_diverse_member_over_a_clone():
    strong, other = synthetic_members(2, 1500, 5, signal=[2.0, 1.7], shared=0.0, seed=4)
    clone = replace(strong, logits=strong.logits + np.random.default_rng(9).normal(0, 0.05, strong.logits.shape).astype(np.float32),
                    run="clone")
    r = correlate([strong, clone, other], k=2)
    assert [s.name for s in r.subset] == ["member_00", "member_01"]
    assert r.matrices["prob_corr"][0, 2] < 0.9 < r.matrices["prob_corr"][0, 1]  # other is diverse, clone is not


def test_suggest_subset_directly():
    probs = np.array([np.eye(3)[[0, 1, 2, 0]] * 0.8 + 0.2 / 3, np.full((4, 3), 1 / 3)])
    picks = suggest_subset(probs, np.array([0, 1, 2, 0]), 2, np.eye(2))
    assert [j for j, _, _ in picks] == [0, 1]


def test_unlabelled_files_give_label_free_measures_and_a_note():
    a, b = synthetic_members(2, 300, 4, seed=5, split="test")
    a = replace(a, labels=np.full(300, -1))
    b = replace(b, labels=np.full(300, -1))
    r = correlate([a, b])
    assert np.isfinite(r.matrices["prob_corr"][0, 1]) and np.isfinite(r.matrices["disagreement"][0, 1])
    assert np.isnan(r.matrices["double_fault"][0, 1]) and np.isnan(r.kappa)
    assert r.subset == [] and "no labels" in r.notes[0]


def test_refuses_mismatched_files_naming_the_first_differing_id(tmp_path):
    a, b = synthetic_members(2, 50, 3, seed=6)
    b = replace(b, ids=[*b.ids[:-1], "other.jpg"])
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_predictions(pa, a)
    write_predictions(pb, b)
    result = CliRunner().invoke(main, ["correlate", str(pa), str(pb)])
    assert result.exit_code == 1
    assert "first differing id 'img_000049.jpg'" in result.output and "b.safetensors" in result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("preds, k, match", [
    ("one", 3, r"need at least 2 prediction files or runs to compare, got 1"),
    ("two", 0, r"k: expected a subset size >= 1, got 0"),
])
def test_correlate_argument_errors(preds, k, match):
    members = synthetic_members(2, 20, 3)
    with pytest.raises(UserInputError, match=match):
        correlate(members[:1] if preds == "one" else members, k=k)


def test_unknown_measure_lists_the_valid_names():
    with pytest.raises(UserInputError, match=r"measure: expected one of prob_corr, correct_corr, disagreement, double_fault, yule_q, cohen_kappa, got 'q'"):
        get_measure("q")


def test_cli_prints_a_matrix_and_writes_csv_json_png(tmp_path):
    runs = write_synthetic_runs(tmp_path / "runs", synthetic_members(3, 200, 4, signal=[1, 2, 3], seed=7))
    out = tmp_path / "report"
    result = CliRunner().invoke(main, ["correlate", *map(str, runs), "--out", str(out), "-k", "2", "--measure", "yule_q"])
    assert result.exit_code == 0, result.output
    assert "Yule's Q" in result.output and "member_02" in result.output and "Kuncheva-Whitaker kappa" in result.output
    assert "suggested subset of 2" in result.output
    files = {p.name for p in out.iterdir()}
    assert {"members.csv", "pairs.csv", "correlation.json", "heatmap.png"} <= files
    assert {f"matrix_{m}.csv" for m in PAIRWISE_MEASURES} <= files
    assert (out / "heatmap.png").read_bytes()[:4] == b"\x89PNG"
    data = json.loads((out / "correlation.json").read_text())
    assert len(data["pairs"]) == 3 and data["matrices"]["prob_corr"][0][0] == pytest.approx(1.0)
    assert (out / "pairs.csv").read_text().splitlines()[0] == "a,b," + ",".join(PAIRWISE_MEASURES)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_cli_needs_two_sources(tmp_path):
    runs = write_synthetic_runs(tmp_path, synthetic_members(1, 20, 3))
    result = CliRunner().invoke(main, ["correlate", str(runs[0])])
    assert result.exit_code == 2 and "need at least 2" in result.output


def test_cli_reads_prediction_files_and_names_a_missing_one(tmp_path):
    result = CliRunner().invoke(main, ["correlate", str(tmp_path / "nope.safetensors"), str(tmp_path / "x")])
    assert result.exit_code == 1
    assert "nope.safetensors: no such prediction file" in result.output


def test_prediction_file_with_no_name_collisions(tmp_path):
    a, b = synthetic_members(2, 40, 3, seed=8)
    paths = []
    for folder, p in (("x", a), ("y", b)):
        path = tmp_path / folder / "val.safetensors"
        write_predictions(path, replace(p, run=""))
        paths.append(str(path))
    result = CliRunner().invoke(main, ["correlate", *paths])
    assert result.exit_code == 0, result.output
    assert "x/val" in result.output and "y/val" in result.output

