"""The canary privacy audit (issue 16): the estimator against external numbers, the reach of the
audit-only switches (no noise, no clipping, seeded noise), the seeded noise itself, and the
end-to-end verdicts on the engine's real DP aggregator — deterministic, from fixed seeds."""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import dp_accounting
import numpy as np
import pytest
from scipy.stats import norm

from engine import training
from engine.job import JobSpec, JobSpecInvalid
from engine.privacy_audit import (
    BROKEN_MECHANISMS,
    AuditConfig,
    PrivacyAuditFailed,
    PrivacyAuditResult,
    check_audit,
    empirical_epsilon,
    gaussian_dp_epsilon,
)
from gateway import cli_privacy_audit
from gateway.admission import JobRequest
from gateway.problems import Problem

DELTA = 1e-5
ROOT = Path(__file__).resolve().parent.parent
AUDIT_SWITCHES = ("audit_noise_disabled", "audit_clipping_removed", "noise_seed")


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
        return PrivacyAuditResult(config=AuditConfig(), broken=None,
                                  analytic_epsilon=4.0, empirical_epsilon=sum(interval) / 2,
                                  interval=interval, mu=1.0, canary_cosines=np.zeros(2),
                                  null_cosines=np.zeros(2))

    check_audit(result((3.0, 5.0)))  # straddles: not evidence of a violation
    with pytest.raises(PrivacyAuditFailed, match="exceeds the analytic"):
        check_audit(result((4.5, 6.0)))


# --- the audit-only switches cannot be reached by a job or the gateway -------------------------


@pytest.mark.parametrize("switch", AUDIT_SWITCHES)
def test_audit_switch_is_keyword_only_and_neither_a_job_field_nor_a_request_field(
    switch: str,
) -> None:
    parameter = inspect.signature(training.dp_aggregator).parameters[switch]
    assert parameter.kind is inspect.Parameter.KEYWORD_ONLY
    assert switch not in inspect.signature(training.prepare_training).parameters
    with pytest.raises(JobSpecInvalid, match="unexpected field"):
        JobSpec.from_json({**AuditConfig().job_spec().to_json(), switch: 1})
    request = {"dataset": "demo", "model_digest": "sha256:" + "0" * 64, "rounds": 1,
               "clients_per_round": 10, "noise_multiplier": 1.0, "clip": 1.0}
    JobRequest.from_json(request)  # the same request without the switch is valid
    with pytest.raises(Problem, match="unknown fields"):
        JobRequest.from_json({**request, switch: 1})


def _dp_aggregator_calls(path: Path) -> list[ast.Call]:
    return [node for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Call)
            and (getattr(node.func, "id", None) == "dp_aggregator"
                 or getattr(node.func, "attr", None) == "dp_aggregator")]


def _imported_modules(path: Path) -> set[str]:
    modules = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            modules.add(node.module)
        elif isinstance(node, ast.Import):
            modules.update(alias.name for alias in node.names)
    return modules


def test_only_the_audit_builds_the_aggregator_with_a_switch() -> None:
    calls = {path.relative_to(ROOT).as_posix(): _dp_aggregator_calls(path)
             for package in ("engine", "gateway", "ledger") for path in (ROOT / package).glob("*.py")}
    assert [len(c) for c in (calls["engine/training.py"], calls["engine/privacy_audit.py"])] == [1, 1]
    for path, found in calls.items():
        if path != "engine/privacy_audit.py":
            assert all(not call.keywords and len(call.args) == 1 for call in found), path
    importers = [path.relative_to(ROOT).as_posix() for package in ("engine", "gateway", "ledger")
                 for path in sorted((ROOT / package).glob("*.py"))
                 if "engine.seeded_noise" in _imported_modules(path)]
    assert importers == ["engine/training.py"]  # inside dp_aggregator's noise_seed branch


def test_cli_break_choices_are_the_audits_broken_mechanisms() -> None:
    parser = argparse.ArgumentParser()
    cli_privacy_audit.register(parser.add_subparsers())
    for name in BROKEN_MECHANISMS:
        args = parser.parse_args(["audit-privacy", "--break", name])
        assert args.broken == name and not args.fresh_noise and args.noise_seed is None
    for refused in (["--break", "sampling"], ["--noise-seed", "1", "--fresh-noise"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["audit-privacy", *refused])


# --- the aggregator a job gets vs the audit's copies (in process: builds, does not train) -----


@pytest.mark.tff
def test_jobs_get_fresh_noise_and_the_audits_copies_differ_only_in_the_audited_part(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tensorflow_privacy as tfp

    from engine.seeded_noise import SeededGaussianSumQuery

    spec = AuditConfig(noise_multiplier=1.5, clip=2.0).job_spec()

    def parts(factory: Any) -> tuple[type, float, float, float]:
        query = factory._query
        assert type(query) is tfp.NormalizedQuery
        sum_query = query._numerator
        return type(sum_query), sum_query._l2_norm_clip, sum_query._stddev, query._denominator

    job = parts(training.dp_aggregator(spec))
    assert job == (tfp.GaussianSumQuery, 2.0, 3.0, spec.expected_clients_per_round)
    assert parts(training.dp_aggregator(spec, noise_seed=5)) == (SeededGaussianSumQuery, *job[1:])
    assert parts(training.dp_aggregator(spec, audit_noise_disabled=True))[1:3] == (2.0, 0.0)
    assert parts(training.dp_aggregator(spec, audit_clipping_removed=True))[:3] == (
        tfp.GaussianSumQuery, 1e30, 3.0)

    # prepare_training (the only builder of a job's process) asks for the plain aggregator.
    seen: list[dict[str, Any]] = []

    class Built(Exception):
        pass

    def recording_aggregator(*args: Any, **kwargs: Any) -> None:
        seen.append(kwargs)
        raise Built

    monkeypatch.setattr(training, "dp_aggregator", recording_aggregator)
    with pytest.raises(Built):
        training.prepare_training({}, SimpleNamespace(outputs_probabilities=True), spec, 4)
    assert seen == [{}]


@pytest.mark.tff
def test_seeded_noise_has_the_configured_std_changes_every_round_and_repeats_from_the_seed() -> None:
    import tensorflow as tf

    from engine.seeded_noise import SeededGaussianSumQuery

    query = SeededGaussianSumQuery(l2_norm_clip=1.0, stddev=2.0, seed=3)
    zeros = [tf.zeros((50_000,)), tf.zeros((100, 10))]
    start = query.initial_global_state()
    first, state, event = query.get_noised_result(zeros, start)
    second, _, _ = query.get_noised_result(zeros, state)
    again, _, _ = query.get_noised_result(zeros, start)
    values = np.concatenate([np.ravel(t.numpy()) for t in first])
    assert np.std(values) == pytest.approx(2.0, rel=0.02)
    assert abs(np.mean(values)) < 0.03
    assert float(event.noise_multiplier) == 2.0
    assert all(np.array_equal(a.numpy(), b.numpy()) for a, b in zip(first, again, strict=True))
    assert not np.array_equal(first[0].numpy(), second[0].numpy())
    assert not np.array_equal(first[0].numpy()[:1000], first[0].numpy()[1000:2000])
    clipped = query.preprocess_record(query.derive_sample_params(start), [tf.fill((4,), 5.0)])
    assert float(tf.norm(clipped[0])) == pytest.approx(1.0)


# --- end to end on the engine's DP aggregator (own process, like a job; fixed seeds) ----------


@pytest.fixture(scope="module")
def configured_audit() -> dict[str, Any]:
    return cli_privacy_audit.run_audit_process(AuditConfig())


@pytest.mark.tff
def test_configured_mechanism_estimate_stays_at_or_below_the_analytic_epsilon(
    configured_audit: dict[str, Any],
) -> None:
    result = configured_audit
    assert result["mechanism"] == "as configured"
    assert result["noise"] == "seeded (audit only)"
    assert result["analytic_epsilon"] == pytest.approx(4.848, abs=1e-3)
    assert result["empirical_epsilon"] <= result["analytic_epsilon"]
    assert result["empirical_interval"][1] <= result["analytic_epsilon"]
    assert result["passed"]


@pytest.mark.tff
def test_two_audits_from_the_same_seeds_are_bit_identical(configured_audit: dict[str, Any]) -> None:
    again = cli_privacy_audit.run_audit_process(AuditConfig())
    assert again == configured_audit  # every cosine, the bootstrap interval, the estimate
    assert len(set(again["null_cosines"])) == AuditConfig().null_directions


@pytest.mark.tff
def test_disabled_noise_is_detected_far_above_the_analytic_epsilon_and_the_command_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    plot = tmp_path / "audit.png"
    args = argparse.Namespace(rounds=None, canaries=None, noise_multiplier=None, population=None,
                              delta=None, seed=None, noise_seed=None, fresh_noise=False,
                              clients_per_round=None, broken="noise", json=True, plot=str(plot))
    assert cli_privacy_audit.cmd_audit_privacy(args) == cli_privacy_audit.EXIT_FAILED
    summary = json.loads(capsys.readouterr().out)
    assert summary["mechanism"] == "noise disabled (audit only)"
    assert summary["empirical_interval"][0] > 2 * summary["analytic_epsilon"]
    assert not summary["passed"]
    assert plot.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


@pytest.mark.tff
def test_removed_clipping_is_detected_far_above_the_analytic_epsilon() -> None:
    result = cli_privacy_audit.run_audit_process(AuditConfig(), broken="clipping")
    assert result["mechanism"] == "clipping removed (audit only)"
    assert result["empirical_interval"][0] > 2 * result["analytic_epsilon"]
    assert not result["passed"]
    with pytest.raises(PrivacyAuditFailed, match="exceeds the analytic"):
        check_audit(PrivacyAuditResult(
            config=AuditConfig(), broken="clipping", analytic_epsilon=result["analytic_epsilon"],
            empirical_epsilon=result["empirical_epsilon"],
            interval=tuple(result["empirical_interval"]), mu=result["mu"],
            canary_cosines=np.array(result["canary_cosines"]),
            null_cosines=np.array(result["null_cosines"])))
