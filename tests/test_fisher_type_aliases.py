"""``fisher_type`` accepts the spellings of laplace-torch and curvlinops, and nothing else."""

import pytest
import torch
from torch import nn

import cola_curvature as cc
from cola_curvature.options import FISHER_TYPE_ALIASES, FisherType, parse_option

SPELLINGS = {
    FisherType.TYPE2: ["type-2", "type_2", "type2", "TYPE2", "Type-2", "ggn"],
    FisherType.MC: ["mc", "MC"],
    FisherType.EMPIRICAL: ["empirical", "ef", "EF", "empirical_fisher"],
    FisherType.FORWARD_ONLY: ["forward-only", "forward_only", "FORWARD_ONLY"],
}
CASES = [(spelling, member) for member, spellings in SPELLINGS.items() for spelling in spellings]


@pytest.mark.parametrize(("spelling", "member"), CASES)
def test_spellings_map_to_the_member(spelling, member):
    assert parse_option(FisherType, spelling, "fisher_type") is member
    assert FisherType(spelling) is member


def test_every_alias_is_tested():
    tested = {spelling.lower().replace("_", "-") for spelling, _ in CASES}
    assert set(FISHER_TYPE_ALIASES) <= tested


def test_curvlinops_members_map_by_value():
    curvlinops_kfac = pytest.importorskip("curvlinops.kfac")
    for theirs in curvlinops_kfac.FisherType:
        ours = parse_option(FisherType, theirs, "fisher_type")
        assert ours.value == theirs.value and ours.name == theirs.name


@pytest.mark.parametrize("value", ["type-3", "fisher", "", 2, None])
def test_unknown_fisher_type_lists_the_accepted_spellings(value):
    with pytest.raises(ValueError, match="fisher_type") as error:
        parse_option(FisherType, value, "fisher_type")
    for spelling in FisherType.accepted_spellings():
        assert repr(spelling) in str(error.value)


def test_operators_accept_the_aliases():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2)).to(torch.float64)
    params = list(model.parameters())
    data = [(torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64))]
    kfac = cc.KFAC(model, nn.MSELoss(), params, data, fisher_type="ef")
    assert kfac.fisher_type is FisherType.EMPIRICAL
    diagonal = cc.DiagonalCurvature(model, nn.MSELoss(), params, data, fisher_type="type_2")
    assert diagonal.fisher_type is FisherType.TYPE2
    with pytest.raises(ValueError, match="'ef'"):
        cc.KFAC(model, nn.MSELoss(), params, data, fisher_type="typo")
