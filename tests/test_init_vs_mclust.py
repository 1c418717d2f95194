"""The default initialisation against R's mclust 6.0: cases it used to miss (``benchmarks/mclust_init.py``).

The best of ``n_init=10`` (plain EM to a tight tolerance, ``reg_covar=0`` as mclust) must end within
0.01 nats of mclust's total log-likelihood (the fixtures' ``loglik``) or above it, with a sound
(non-degenerate) fit. Each case missed before the initialisation's restarts drew k-means++ seeds as
candidates (e.g. wdbc VVV G=2: every restart ended at one k-means partition, 256 nats below), and
spherical ones in the model's own metric.
"""

from __future__ import annotations

import warnings

import pytest
from test_mclust_models import fit_ref, load

import daskem

pytestmark = pytest.mark.slow

MODELS = {"VVV": "full", "EEE": "tied", "VVI": "diag", "VII": "spherical"}


#: missed before (gap to mclust in nats, ``benchmarks/results/mclust_init_before.json``), except faithful VVV 4
#: (the issue's example of restarts that did not explore: -1114.69 against k-means++'s -1106.0)
PINNED = [
    ("wdbc", "VVV", 2),  # -256.2: all ten restarts at one k-means partition
    ("wdbc", "VVV", 3),  # -643.5
    ("faithful", "VVV", 4),
    ("thyroid", "VVV", 6),  # the fit failed: a restart's start had a singular covariance (rounded data)
    ("banknote", "VII", 4),  # -14.3
    ("thyroid", "VII", 3),  # -71.9: spherical candidates in the model's own metric
    ("wreath", "VVI", 6),  # -17.2
]


@pytest.mark.parametrize("name, model, G", PINNED)
def test_best_of_ten_restarts_reaches_mclust(name, model, G) -> None:
    X, _ = load(name)
    ref = fit_ref(name, model, G)["loglik"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm = daskem.GaussianMixture(
            G,
            covariance_type=MODELS[model],
            n_init=10,
            random_state=0,
            tol=1e-9,
            max_iter=5000,
            reg_covar=0.0,
            accelerate=None,
        ).fit(X)
    assert gm.degenerate_reason(X.shape[0]) == ""
    assert gm.lower_bound_ * X.shape[0] >= ref - 0.01
