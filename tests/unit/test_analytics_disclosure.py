"""Disclosure control: small cells suppressed, and no released total gives a suppressed one away.

The proof is independent of the implementation's rank test: for every suppressed entry, linear
programming over the table's additivity equations (each row and column adds up to its total), the
released entries as they are and non-negative unknowns finds the smallest and largest value the
entry can take. A disclosed entry has one value; a protected one spans at least one unit each side
of the truth where the truth allows (every suppressed count is positive, so it can always move).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import linprog

from fedcore.analytics.disclosure import (
    ANALYSIS_KINDS,
    DisclosurePolicy,
    DisclosureRefused,
    check_analysis_allowed,
    check_min_sites,
    check_site_count,
    suppress_table,
    table_equations,
)


def feasible_range(table, entry: int, lower: float = 0) -> tuple[float, float]:
    """Smallest and largest value of one suppressed entry given everything released."""
    equations = table_equations(table)
    values = table.extended.ravel().astype(float)
    hidden = np.flatnonzero(table.suppressed.ravel())
    shown = np.flatnonzero(~table.suppressed.ravel())
    a_eq = equations[:, hidden]
    b_eq = -equations[:, shown] @ values[shown]
    target = np.zeros(hidden.size)
    target[list(hidden).index(entry)] = 1.0
    bounds = [(lower, None)] * hidden.size
    low = linprog(target, A_eq=a_eq, b_eq=b_eq, bounds=bounds, method="highs")
    high = linprog(-target, A_eq=a_eq, b_eq=b_eq, bounds=bounds, method="highs")
    assert low.status == 0 and high.status in (0, 3)
    return low.fun, (np.inf if high.status == 3 else -high.fun)


def assert_protected(table, min_count: int) -> None:
    flat = table.extended.ravel()
    released = flat[~table.suppressed.ravel()]
    # every released entry respects the minimum count (zeros are not people)
    assert np.all((released == 0) | (released >= min_count))
    for entry in np.flatnonzero(table.suppressed.ravel()):
        low, high = feasible_range(table, entry)
        assert low <= flat[entry] <= high
        assert high - low >= 1 - 1e-9, f"entry {entry} = {flat[entry]} is determined"
        # the truth can move both ways (all suppressed counts are positive)
        assert low <= flat[entry] - 1 + 1e-9 and high >= flat[entry] + 1 - 1e-9
        # and, since zeros are released, a reader knows every suppressed count is at least 1:
        # still not determined
        low, high = feasible_range(table, entry, lower=1)
        assert high - low >= 1 - 1e-9, f"entry {entry} = {flat[entry]} is pinned by positivity"


def test_a_single_small_cell_in_a_row_is_protected_by_a_second_one() -> None:
    table = suppress_table([[3, 20, 40], [30, 25, 12]], 5)
    assert table.primary.sum() == 1
    # one complementary cell in its row, one in its column, and the fourth corner
    assert table.suppressed[:2, :3].sum() == 4
    assert_protected(table, 5)


def test_a_one_dimensional_table_with_its_total() -> None:
    table = suppress_table([12, 2, 30, 9], 5)
    assert table.suppressed.ravel().tolist() == [False, True, False, True, False]
    released = table.released()
    assert released["cells"] == [12, None, 30, None]
    assert released["total"] == 53
    assert_protected(table, 5)


def test_a_small_total_is_suppressed_with_its_cells() -> None:
    table = suppress_table([[1, 2], [30, 40]], 5)
    assert_protected(table, 5)
    assert table.released()["row_totals"][0] is None


def test_a_table_without_small_cells_is_released_whole() -> None:
    table = suppress_table([[10, 0], [7, 50]], 5)
    assert not table.suppressed.any()
    assert table.released()["cells"] == [[10, 0], [7, 50]]


def test_two_cells_in_a_row_are_not_enough_when_the_column_gives_one_away() -> None:
    # Row 0 has two small cells, but column 1's other cells are all released zeros: its total
    # would give the (0, 1) cell away unless something else is withheld too.
    table = suppress_table([[2, 3, 40], [20, 0, 30], [25, 0, 35]], 5)
    assert_protected(table, 5)


def test_two_small_cells_whose_released_total_leaves_two_are_protected_further() -> None:
    # The lung demo's sex by ECOG table: row 0 holds the only patients with ECOG 3 and without a
    # score, one each. Withholding both and their column totals satisfies the equations (x + y =
    # 2 has many real solutions), but both are known to be at least 1: x = y = 1.
    counts = [[36, 71, 28, 1, 1], [27, 42, 21, 0, 0]]
    table = suppress_table(counts, 5)
    assert_protected(table, 5)
    assert table.released()["row_totals"][0] is None or any(
        c is None for c in table.released()["cells"][0][:3]
    )


@pytest.mark.parametrize("seed", range(60))
def test_random_tables_never_reveal_a_suppressed_cell(seed: int) -> None:
    rng = np.random.default_rng(seed)
    if seed % 3 == 0:
        counts = rng.choice([0, 1, 2, 3, 4, 6, 9, 15, 40], size=int(rng.integers(2, 8)))
    else:
        shape = (int(rng.integers(2, 6)), int(rng.integers(2, 6)))
        counts = rng.choice([0, 0, 1, 2, 3, 4, 5, 7, 12, 30], size=shape)
    table = suppress_table(counts, 5)
    assert_protected(table, 5)


def test_bad_tables_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        suppress_table([3, -1])
    with pytest.raises(ValueError, match="whole numbers"):
        suppress_table([1.5, 2])
    with pytest.raises(ValueError, match="1-D or 2-D"):
        suppress_table(np.zeros((2, 2, 2), dtype=int))


def test_policy_reads_site_toml_defaults_and_refuses_unknown_keys() -> None:
    policy = DisclosurePolicy.from_dict({})
    assert policy.min_cell_count == 5
    assert policy.min_sites == 3
    assert policy.allowed_analyses == ANALYSIS_KINDS
    assert policy.time_step is None
    custom = DisclosurePolicy.from_dict(
        {"min_cell_count": 10, "min_sites": 4, "allowed_analyses": ["count"], "time_step": 30}
    )
    assert (custom.min_cell_count, custom.min_sites, custom.time_step) == (10, 4, 30)
    with pytest.raises(ValueError, match="unknown key"):
        DisclosurePolicy.from_dict({"min_cells": 5})
    with pytest.raises(ValueError, match="unknown kind"):
        DisclosurePolicy.from_dict({"allowed_analyses": ["sql"]})
    with pytest.raises(ValueError, match="time_step"):
        DisclosurePolicy.from_dict({"time_step": 0})
    with pytest.raises(ValueError, match="min_cell_count"):
        DisclosurePolicy.from_dict({"min_cell_count": 0})


def test_policy_checks_refuse_with_the_reason() -> None:
    policy = DisclosurePolicy(allowed_analyses=("count", "cox"))
    check_analysis_allowed(policy, "cox")
    with pytest.raises(DisclosureRefused, match="does not run 'quantile'"):
        check_analysis_allowed(policy, "quantile")
    check_min_sites(policy, 3)
    with pytest.raises(DisclosureRefused, match="at least 3 sites"):
        check_min_sites(policy, 2)
    check_site_count(policy, 0, "the cohort")
    check_site_count(policy, 5, "the cohort")
    with pytest.raises(DisclosureRefused, match="fewer than 5 rows"):
        check_site_count(policy, 4, "the cohort")
