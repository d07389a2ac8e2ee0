"""The canary privacy audit (issue 16): the estimator against external numbers, the audit-only
noise switch's reach, and the end-to-end verdicts on the engine's real DP aggregator."""

from __future__ import annotations

import argparse
import inspect
import json
import math
from pathlib import Path

import dp_accounting
import numpy as np
import pytest
from scipy.stats import norm

from engine import runner, training
from engine.job import JobSpec, JobSpecInvalid
from engine.privacy_audit import (
    AuditConfig,
    PrivacyAuditFailed,
    PrivacyAuditResult,
    check_audit,
    empirical_epsilon,
    gaussian_dp_epsilon,
)
from gateway import cli_privacy_audit

DELTA = 1e-5


# --- the estimator, checked against dp-accounting's PLD for the Gaussian mechanism -------------


@pytest.mark.parametrize("mu", [0.3, 1.0, 2.0, 5.0])
def test_gdp_epsilon_matches_the_gaussian_mechanism_with_sigma_one_over_mu(mu: float) -> None:
    accountant = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-4)
    accountant.compose(dp_accounting.GaussianDpEvent(noise_multiplier=1.0 / mu))
    assert gaussian_dp_epsilon(mu, DELTA) == pytest.approx(accountant.get_epsilon(DELTA), abs=2e-3)


def test_gdp_epsilon_is_zero_when_delta_covers_the_whole_distinguishing_advantage() -> None:
    mu = 0.5
    total_variation = 2 * norm.cdf(mu / 2) - 1
    assert gaussian_dp_epsilon(mu, total_variation * 1.01) == 0.0
    assert gaussian_dp_epsilon(-1.0, DELTA) == 0.0
    assert gaussian_dp_epsilon(math.inf, DELTA) == math.inf


def test_empirical_epsilon_uses_the_null_spread_as_unit() -> None:
    null = np.array([-1.0, 0.0, 1.0]) * 0.01  # std 0.01
    canary = np.full(10, 0.02)                  # mean 2 null standard deviations above
    assert empirical_epsilon(canary, null, DELTA) == pytest.approx(gaussian_dp_epsilon(2.0, DELTA))


def test_check_raises_only_when_the_interval_lies_above_the_analytic_epsilon() -> None:
    def result(interval: tuple[float, float]) -> PrivacyAuditResult:
        return PrivacyAuditResult(config=AuditConfig(), noise_disabled=False,
                                  analytic_epsilon=4.0, empirical_epsilon=sum(interval) / 2,
                                  interval=interval, mu=1.0, canary_cosines=np.zeros(2),
                                  null_cosines=np.zeros(2))

    check_audit(result((3.0, 5.0)))  # straddles: not evidence of a violation
    with pytest.raises(PrivacyAuditFailed, match="exceeds the analytic"):
        check_audit(result((4.5, 6.0)))


# --- the audit-only switch cannot be reached by a job ------------------------------------------


def test_noise_switch_is_not_a_job_field_and_runner_never_passes_it() -> None:
    spec = AuditConfig().job_spec().to_json()
    with pytest.raises(JobSpecInvalid, match="unexpected field"):
        JobSpec.from_json({**spec, "audit_noise_disabled": True})
    assert "audit_noise_disabled" not in inspect.signature(training.prepare_training).parameters
    parameter = inspect.signature(training.dp_aggregator).parameters["audit_noise_disabled"]
    assert parameter.kind is inspect.Parameter.KEYWORD_ONLY
    for module in (runner, training):
        source = inspect.getsource(module)
        assert "audit_noise_disabled=" not in source.replace("audit_noise_disabled: bool", "")


# --- end to end on the engine's DP aggregator (own process, like a job) ------------------------


@pytest.mark.tff
def test_configured_mechanism_estimate_stays_at_or_below_the_analytic_epsilon() -> None:
    result = cli_privacy_audit.run_audit_process(AuditConfig())
    assert result["mechanism"] == "as configured"
    assert result["analytic_epsilon"] == pytest.approx(4.848, abs=1e-3)
    assert result["empirical_epsilon"] <= result["analytic_epsilon"]
    assert result["passed"]


@pytest.mark.tff
def test_disabled_noise_is_detected_far_above_the_analytic_epsilon_and_the_command_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plot = tmp_path / "audit.png"
    args = argparse.Namespace(rounds=None, canaries=None, noise_multiplier=None, population=None,
                              delta=None, seed=None, clients_per_round=None, disable_noise=True,
                              json=True, plot=str(plot))
    assert cli_privacy_audit.cmd_audit_privacy(args) == cli_privacy_audit.EXIT_FAILED
    summary = json.loads(capsys.readouterr().out)
    assert summary["mechanism"] == "noise disabled (audit only)"
    assert summary["empirical_interval"][0] > 2 * summary["analytic_epsilon"]
    assert not summary["passed"]
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
