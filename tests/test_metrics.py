"""Task metrics: normalisation refuses a counterfactual that does not lower the metric."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from lsa import metrics
from lsa.patching import PatchResult


def test_normalized_is_zero_at_clean_and_minus_one_at_the_counterfactual():
    clean, corrupt = torch.tensor(6.0), torch.tensor(-2.0)
    patched = torch.tensor([6.0, -2.0, 2.0, 10.0])
    assert metrics.normalized(patched, clean, corrupt).tolist() == [0.0, -1.0, -0.5, 0.5]


@pytest.mark.parametrize(
    ("clean", "corrupt", "why"),
    [
        (6.02, 6.24, "of the wrong sign"),  # Gemma 3, Chinese copying, adverb counterfactual
        (6.02, 5.9, "near zero"),  # a gap of 0.12 is 2% of the metric
        (3.0, 3.0, "near zero"),
        (0.0, 0.0, "near zero"),
    ],
)
def test_normalized_refuses_a_counterfactual_that_does_not_lower_the_metric(clean, corrupt, why):
    with pytest.raises(ValueError, match=rf"refusing to normalise: clean metric .* is {why}.*counterfactual='verb'"):
        metrics.normalized(torch.tensor(1.0), torch.tensor(clean), torch.tensor(corrupt))


def test_normalized_accepts_a_gap_just_above_its_floor():
    # floor = 0.05 x max(|clean|, |corrupt|) = 0.05 x 10
    assert metrics.normalized(torch.tensor(10.0), torch.tensor(10.0), torch.tensor(9.49)) == 0.0
    with pytest.raises(ValueError, match="near zero"):
        metrics.normalized(torch.tensor(10.0), torch.tensor(10.0), torch.tensor(9.51))


def _result(clean: list[float], corrupt: list[float]) -> PatchResult:
    patched = torch.tensor([[1.0, 2.0], [0.0, -1.0]])
    return PatchResult(
        components=pd.DataFrame({"site": ["head", "head"], "layer": [0, 0], "head": [0, 1]}),
        patched=patched,
        clean=torch.tensor(clean),
        corrupt=torch.tensor(corrupt),
        dims=("layer", "head"),
        axes={"layer": [0], "head": [0, 1]},
    )


def test_patch_result_normalises_means_when_the_counterfactual_flips_the_metric():
    res = _result([2.0, 4.0], [-1.0, -1.0])  # means 3 and -1
    assert res.normalized.tolist() == [(1.5 - 3) / 4, (-0.5 - 3) / 4]
    assert res.frame["normalized"].tolist() == res.normalized.tolist()


def test_patch_result_gives_nan_and_a_warning_when_normalisation_is_refused():
    res = _result([6.0, 6.04], [6.2, 6.28])  # the counterfactual raises the metric
    with pytest.warns(UserWarning, match=r"activation patching \(noising\): refusing to normalise.*wrong sign"):
        frame = res.frame
    assert frame["normalized"].isna().all()
    assert frame["effect"].tolist() == pytest.approx([1.5 - 6.02, -0.5 - 6.02])  # effects stay defined
    with pytest.warns(UserWarning):
        assert torch.isnan(res.array).all()
