import numpy as np
import pytest

from defectlens.thresholds import from_normal_scores


def test_threshold_is_a_quantile_of_normal_scores():
    scores = np.arange(1, 101, dtype=float)  # 1..100
    t = from_normal_scores(scores, target_far=0.05)
    assert (scores > t.image).mean() <= 0.05
    assert t.image == 96.0 and t.pixel == t.image and t.n_validation == 100


def test_few_validation_images_give_their_maximum():
    t = from_normal_scores(np.array([3.0, 1.0, 2.0]), target_far=0.01)
    assert t.image == 3.0 and t.validation_max == 3.0


def test_invalid_inputs():
    with pytest.raises(ValueError):
        from_normal_scores(np.array([]), 0.01)
    with pytest.raises(ValueError):
        from_normal_scores(np.array([1.0]), 1.5)
