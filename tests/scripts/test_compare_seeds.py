"""scripts/compare.py's seed statistics: the spread and the gap in standard errors that the README quotes."""

from __future__ import annotations

import math
import sys

import pytest

from tests.launch import ROOT

sys.path.insert(0, str(ROOT / "scripts"))

import compare  # noqa: E402


def test_mean_spread_is_the_sample_standard_deviation():
    mean, sd = compare.mean_spread([0.80, 0.82, 0.87])
    assert mean == pytest.approx(0.83)
    assert sd == pytest.approx(math.sqrt(((0.03) ** 2 + (0.01) ** 2 + (0.04) ** 2) / 2))  # n - 1, not n
    assert compare.mean_spread([0.5]) == (0.5, 0.0)


def test_gap_in_standard_errors_is_welchs_t():
    a, b = [0.80, 0.82, 0.87], [0.83, 0.84, 0.85]
    sa, sb = compare.mean_spread(a)[1], compare.mean_spread(b)[1]
    expected = (0.83 - 0.84) / math.sqrt(sa**2 / 3 + sb**2 / 3)
    assert compare.gap_in_standard_errors(a, b) == pytest.approx(expected)
    assert compare.gap_in_standard_errors(b, a) == pytest.approx(-expected)
    assert compare.gap_in_standard_errors([1.0, 1.0], [1.0, 1.0]) == 0.0
    assert compare.gap_in_standard_errors([2.0, 2.0], [1.0, 1.0]) == math.inf


def test_seeds_section_states_the_gap_and_counts_divergence():
    study = compare.studies(quick=True)[0]
    r = compare.SeedResult
    by_opt = {
        "cdadam": [r(0.4, 0.5, 0.80, 1.0, False), r(0.5, 0.6, 0.82, 1.0, False), r(0.45, 0.55, 0.87, 1.0, False)],
        "onebitadam": [r(0.4, 0.5, 0.8, 5.0, False), r(9.0, 9.0, 0.1, 5.0, True), r(0.4, 0.5, 0.8, 5.0, False)],
        "adam": [r(0.4, 0.5, 0.83, 30.0, False), r(0.4, 0.5, 0.84, 30.0, False), r(0.4, 0.5, 0.85, 30.0, False)],
    }
    text = "\n".join(compare.seeds_section(study, by_opt))
    # the diverged seed is left out of the spread (its loss of 9 would dominate it)
    assert "| 1-bit Adam | 3 (1) | 0.4000 ± 0.0000 | 0.5000 ± 0.0000 | 0.8000 ± 0.0000 | 5.0 ± 0.0 |" in text
    assert "| CD-Adam | 3 (0) | 0.4500 ± 0.0500 | 0.5500 ± 0.0500 | 0.8300 ± 0.0361 | 1.0 ± 0.0 |" in text
    assert ("test accuracy -0.0100 (-0.5 standard errors of the difference, Welch df 2.3: within the seed noise "
            "at 95%, |t| < 4.30)") in text
    assert ("test loss +0.0500 (+1.7 standard errors of the difference, Welch df 2.0: within the seed noise at 95%, "
            "|t| < 4.30)") in text


def test_seeds_section_says_diverged_and_beyond_the_noise():
    study = compare.studies(quick=True)[0]
    r = compare.SeedResult
    by_opt = {
        "cdadam": [r(0.4, 0.60, 0.8, 1.0, False), r(0.4, 0.61, 0.8, 1.0, False), r(0.4, 0.62, 0.8, 1.0, False)],
        "onebitadam": [r(9.0, 9.0, 0.0, 5.0, True)] * 3,
        "adam": [r(0.4, 0.50, 0.8, 30.0, False), r(0.4, 0.51, 0.8, 30.0, False), r(0.4, 0.52, 0.8, 30.0, False)],
    }
    text = "\n".join(compare.seeds_section(study, by_opt))
    assert "| 1-bit Adam | 3 (3) | diverged | diverged | diverged | 5.0 ± 0.0 |" in text
    assert ("test loss +0.1000 (+12.2 standard errors of the difference, Welch df 4.0: beyond the seed noise at 95%, "
            "|t| >= 2.78)") in text


def test_welch_degrees_of_freedom_and_the_t_cutoff():
    # equal spreads and sizes: df = 2 (n - 1); one spread 0: df = n - 1 of the other
    assert compare.welch_degrees_of_freedom([1.0, 1.1, 1.2], [0.8, 0.9, 1.0]) == pytest.approx(4.0)
    assert compare.welch_degrees_of_freedom([0.5, 0.6, 0.55], [0.5, 0.5, 0.5]) == pytest.approx(2.0)
    assert compare.welch_degrees_of_freedom([1.0, 1.0], [2.0, 2.0]) == math.inf
    # 2.45 standard errors with 3 seeds each is not beyond the noise at 95% (the normal's 1.96 would say it is)
    t = compare.gap_in_standard_errors([1.0, 1.1, 1.2], [0.8, 0.9, 1.0])
    assert t == pytest.approx(2.449, abs=1e-3) and compare.t_critical_95(4.0) == pytest.approx(2.776)
    assert compare.t_critical_95(2.3) == pytest.approx(4.303)  # the tabled df below: conservative
    assert compare.t_critical_95(0.5) == pytest.approx(12.706) and compare.t_critical_95(math.inf) == 1.96
