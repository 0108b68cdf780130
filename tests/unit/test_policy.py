"""The policy rules, exhaustively over the values QMP can show."""

from __future__ import annotations

import itertools

import pytest

from exporter.model.policy import DiskPolicy, PolicyConfig, Rule, verify

ACTIONS = ("retry", "stop", "report", "ignore", "enospc", "auto")


def disk(
    werror: str = "retry", rerror: str = "retry", timeout: int | None = 10000, feature: bool = True
) -> DiskPolicy:
    return DiskPolicy(werror, rerror, 1000 if feature else None, timeout if feature else None, feature)


def test_compliant_disk() -> None:
    v = verify(disk(), PolicyConfig())
    assert v.ok and v.violations == ()


@pytest.mark.parametrize(("werror", "rerror"), list(itertools.product(ACTIONS, ACTIONS)))
def test_every_werror_rerror_combination(werror: str, rerror: str) -> None:
    v = set(verify(disk(werror, rerror), PolicyConfig()).violations)
    expected = set()
    if werror not in ("retry", "auto"):
        expected.add(Rule.WERROR_NOT_RETRY)
    if rerror not in ("retry", "auto"):
        expected.add(Rule.RERROR_NOT_RETRY)
    if "auto" in (werror, rerror):
        expected.add(Rule.POLICY_NOT_VISIBLE)
    assert v == expected


def test_upstream_qemu_without_the_feature() -> None:
    v = verify(disk("stop", "auto", feature=False), PolicyConfig())
    assert v.violations == (Rule.WERROR_NOT_RETRY, Rule.POLICY_NOT_VISIBLE, Rule.RETRY_UNSUPPORTED)
    assert not v.ok


def test_required_set_is_configurable() -> None:
    only_writes = PolicyConfig(required=("werror",))
    assert verify(disk("retry", "report"), only_writes).ok
    assert verify(disk("stop", "retry"), only_writes).violations == (Rule.WERROR_NOT_RETRY,)


@pytest.mark.parametrize(
    ("timeout_ms", "nonzero", "maximum", "expected"),
    [
        (0, False, None, ()),
        (0, True, None, (Rule.TIMEOUT_ZERO,)),
        (0, False, 30.0, (Rule.TIMEOUT_ABOVE_MAX,)),  # "never" exceeds any maximum
        (0, True, 30.0, (Rule.TIMEOUT_ZERO, Rule.TIMEOUT_ABOVE_MAX)),
        (30000, True, 30.0, ()),
        (30001, True, 30.0, (Rule.TIMEOUT_ABOVE_MAX,)),
        (10000, True, None, ()),
    ],
)
def test_timeout_rules(
    timeout_ms: int, nonzero: bool, maximum: float | None, expected: tuple[Rule, ...]
) -> None:
    cfg = PolicyConfig(require_nonzero_timeout=nonzero, max_timeout_seconds=maximum)
    assert verify(disk(timeout=timeout_ms), cfg).violations == expected


def test_timeout_rules_do_not_pile_onto_disks_that_cannot_retry() -> None:
    cfg = PolicyConfig(require_nonzero_timeout=True, max_timeout_seconds=5.0)
    assert verify(disk("stop", "stop", timeout=0), cfg).violations == (
        Rule.WERROR_NOT_RETRY,
        Rule.RERROR_NOT_RETRY,
    )
    assert verify(disk("auto", "auto", feature=False), cfg).violations == (
        Rule.POLICY_NOT_VISIBLE,
        Rule.RETRY_UNSUPPORTED,
    )


def test_rule_values_are_the_documented_label_values() -> None:
    from tests.support.procs import REPO

    doc = (REPO / "docs" / "metrics.md").read_text()
    for rule in Rule:
        assert f"| `{rule.value}` |" in doc


def test_unknown_retry_feature_is_no_violation_of_its_own() -> None:
    """libvirt cannot tell whether QEMU has the retry policy unless a disk uses it: "unknown"
    must not be reported as "unsupported", and the disk's own rules still apply."""
    p = DiskPolicy("stop", "report", None, None, retry_feature=None)
    assert verify(p, PolicyConfig()).violations == (Rule.WERROR_NOT_RETRY, Rule.RERROR_NOT_RETRY)
    p = DiskPolicy("retry", "retry", 1000, 0, retry_feature=None)
    assert verify(p, PolicyConfig(require_nonzero_timeout=True)).violations == (Rule.TIMEOUT_ZERO,)
