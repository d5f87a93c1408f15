"""DG constants against the table of docs/maths.md and an independent mpmath computation of the MP median."""

import math

import pytest
import reference

from dgrepair.kernels.dg_constants import lambda_star, mp_median, omega, omega_poly

SPEC_TABLE = [  # beta, lambda*, mu_beta, omega  (docs/maths.md, 6 decimals)
    (0.05, 1.506607, 0.983308, 1.519341),
    (0.1, 1.581648, 0.966565, 1.608772),
    (0.25, 1.758029, 0.916004, 1.836866),
    (0.375, 1.875805, 0.873451, 2.007098),
    (0.5, 1.978599, 0.830466, 2.171185),
    (0.75, 2.156094, 0.742948, 2.501430),
    (1.0, 2.309401, 0.652776, 2.858362),
]


@pytest.mark.parametrize("beta,lam,mu,om", SPEC_TABLE)
def test_constants_match_spec_table(beta, lam, mu, om):
    # The table is rounded to 6 decimals: agreement within 1e-6 is the strongest check it allows.
    assert lambda_star(beta) == pytest.approx(lam, abs=1e-6)
    assert mp_median(beta) == pytest.approx(mu, abs=1e-6)
    assert omega(beta) == pytest.approx(om, abs=1e-6)


@pytest.mark.parametrize("beta", [0.0156, 0.05, 0.2857142857142857, 0.5, 0.99, 1.0])
def test_mp_median_to_1e9_against_mpmath(beta):
    assert abs(mp_median(beta) - reference.mp_median(beta)) < 1e-9


def test_square_case_closed_forms():
    assert lambda_star(1.0) == pytest.approx(4 / math.sqrt(3), abs=1e-12)
    assert omega(1.0) == pytest.approx(4 / math.sqrt(3) / math.sqrt(mp_median(1.0)), rel=1e-15)


def test_exact_omega_differs_from_the_paper_cubic_where_beta_is_small():
    # measured (docs/adr/0004-cpu-spectral-kernels.md): the cubic is +0.76 % off at beta = 0.01.
    assert omega_poly(0.01) / omega(0.01) - 1 == pytest.approx(0.0076, abs=5e-4)


@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, float("nan")])
def test_beta_out_of_range_is_rejected(bad):
    with pytest.raises(ValueError):
        mp_median(bad)
