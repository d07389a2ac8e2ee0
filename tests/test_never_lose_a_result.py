"""Never lose a result (#25): a wrong node key is found before ε is charged; released models are
saved and reloaded; jobs are found again (list, reattach); Ctrl-C leaves the job running and
says how to come back; the progress output of a job, in a terminal and in a log.

Against a live gateway over loopback HTTP (CLI in a subprocess, SDK in-process); the ledger is
read through the owner's side to show what was (not) charged."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlmodel import select

from gateway.client import Client, FedgateError, JobFailed
from gateway.protocol.node_document import (
    NodeDocument,
    NodeDocumentInvalid,
    NodeKeyMismatch,
    sign_node_document,
    verify_node_document,
)
from gateway.sdk.progress import (
    EPSILON_SO_FAR,
    ProgressLines,
    progress_display,
    progress_phase,
    progress_postfix,
)
from ledger import keys
from ledger.audit import read_entries
from ledger.db import make_engine, session
from ledger.models import Job
from tests.conftest import make_researcher
from tests.test_cli_researcher import researcher_env, sdk  # noqa: F401  (fixtures)
from tests.test_end_to_end import sqlite_node  # noqa: F401  (fixture)
from tests.test_review import write_policy

FIXTURES = Path(__file__).parent / "fixtures"
JOB = {"rounds": 2, "clients_per_round": 20, "noise_multiplier": 1.0, "clip": 1.0}
JOB_ARGS = ["--rounds", "2", "--clients-per-round", "20", "--noise-multiplier", "1.0",
            "--clip", "1.0"]


def _fedgate(*argv: str, env: dict[str, str] | None = None,
             cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``fedgate ARGV`` in a child process, as a researcher's shell runs it."""
    return subprocess.run([sys.executable, "-m", "gateway.cli", *argv], capture_output=True,
                          text=True, env=env or dict(os.environ), cwd=cwd, timeout=300,
                          check=False)


def _ledger(node: Path) -> tuple[list[Job], list[str]]:
    """The owner's view: every job row and every audit action."""
    engine = make_engine(f"sqlite:///{node / 'fedgate.db'}")
    with session(engine) as s:
        jobs = list(s.exec(select(Job)).all())  # reviewed: ORM query, not exec
        actions = [e["action"] for e in read_entries(s)]
    engine.dispose()
    return jobs, actions


# --- the signed node document -----------------------------------------------------------------


def test_node_document_verifies_under_the_key_that_signed_it() -> None:
    node_key = Ed25519PrivateKey.generate()
    signed = sign_node_document(NodeDocument.for_key(node_key.public_key(), "clinic"), node_key)
    document = verify_node_document(json.loads(json.dumps(signed)), node_key.public_key())
    assert document.node_key_id == keys.key_id(node_key.public_key())
    assert document.owner == "clinic"


def test_node_document_signed_by_another_key_names_both_key_ids() -> None:
    node_key, given = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    signed = sign_node_document(NodeDocument.for_key(node_key.public_key(), "clinic"), node_key)
    with pytest.raises(NodeKeyMismatch) as refused:
        verify_node_document(signed, given.public_key())
    message = str(refused.value)
    assert keys.key_id(node_key.public_key()) in message and keys.key_id(given.public_key()) in message
    assert "node.pub" in message and "nothing was submitted" in message


def test_node_document_claiming_your_key_without_its_signature_is_refused() -> None:
    """An impostor can copy the real node's public key into its document, but cannot sign it."""
    real, impostor = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    claimed = NodeDocument.for_key(real.public_key(), "clinic").to_json()
    forged = {"node": claimed, "signature": base64.b64encode(
        impostor.sign(json.dumps(claimed).encode())).decode()}
    with pytest.raises(NodeDocumentInvalid, match="does not verify") as refused:
        verify_node_document(forged, real.public_key())
    assert not isinstance(refused.value, NodeKeyMismatch)


@pytest.mark.parametrize("tamper", [
    lambda d: {**d, "node": {**d["node"], "owner": "mallory"}},      # altered after signing
    lambda d: {**d, "node": {**d["node"], "node_key_id": "k-0000000000000000"}},  # inconsistent
    lambda d: {**d, "node": {**d["node"], "extra": "x"}},             # not the document's shape
    lambda d: {**d, "signature": "not base64!"},
    lambda d: {"node": d["node"]},
    lambda d: [d],
])
def test_altered_or_malformed_node_document_is_refused(tamper) -> None:  # type: ignore[no-untyped-def]
    node_key = Ed25519PrivateKey.generate()
    signed = sign_node_document(NodeDocument.for_key(node_key.public_key(), "clinic"), node_key)
    with pytest.raises(NodeDocumentInvalid):
        verify_node_document(tamper(signed), node_key.public_key())


def test_live_node_serves_its_document_signed_by_its_key(sdk: Client,  # noqa: F811
                                                        researcher_env: Path) -> None:  # noqa: F811
    document = sdk.node()
    assert document.node_key_id == keys.key_id(keys.load_public_key(researcher_env / "node.pub"))
    assert document.owner  # the deployment's owner (Casbin domain)


def test_submit_refused_before_charge_when_node_key_is_wrong(
    researcher_env: Path, tmp_path: Path  # noqa: F811
) -> None:
    """The researcher was given another node's node.pub (or points at the wrong node): the
    client refuses before submitting, so no job exists, no admission is audited and no ε is
    reserved; the message names both key ids and what to fix. SDK and CLI alike."""
    other = Ed25519PrivateKey.generate()
    _, wrong_pub = keys.write_key_pair(other, tmp_path / "other")
    node_key_id = keys.key_id(keys.load_public_key(researcher_env / "node.pub"))
    wrong_key_id = keys.key_id(other.public_key())
    artifact = (FIXTURES / "logreg-20x5.json").read_bytes()

    url, key = os.environ["FEDGATE_URL"], os.environ["FEDGATE_KEY"]
    with Client(url, key=key, node_public_key=researcher_env / "node.pub") as right:
        fits_before = right.estimate("demo", **JOB)["jobs_that_fit"]
    with Client(url, key=key, node_public_key=wrong_pub) as client:
        digest = client.upload_model(artifact)  # uploading is free and charges nothing
        with pytest.raises(NodeKeyMismatch) as refused:
            client.submit("demo", digest, **JOB)
    assert node_key_id in str(refused.value) and wrong_key_id in str(refused.value)

    cli = _fedgate("train", "demo", "--model", str(FIXTURES / "logreg-20x5.json"), *JOB_ARGS,
                   env={**os.environ, "FEDGATE_NODE_KEY": str(wrong_pub)})
    assert cli.returncode == 2, cli.stderr
    assert node_key_id in cli.stderr and wrong_key_id in cli.stderr
    assert "FEDGATE_NODE_KEY" in cli.stderr and "Traceback" not in cli.stderr

    jobs, actions = _ledger(researcher_env)
    assert jobs == [] and "admit" not in actions and "deny" not in actions
    with Client(url, key=key, node_public_key=researcher_env / "node.pub") as right:
        assert right.estimate("demo", **JOB)["jobs_that_fit"] == fits_before


# --- finding your jobs again ------------------------------------------------------------------

HOLD_EVERY_JOB = "p2, researchers, owner, demo, train, require_review, epsilon_above 0.001\n"


def _held_jobs_node(node: Path) -> None:
    """Every train job waits for the owner's review: it stays put (no engine, no TFF) until
    approved, denied or withdrawn."""
    write_policy(node, HOLD_EVERY_JOB)


def _client(node: Path, name: str, tmp_path: Path) -> Client:
    key = make_researcher(node, name)
    return Client(os.environ["FEDGATE_URL"], key=key, node_public_key=node / "node.pub")


def test_job_list_shows_your_own_jobs_newest_first_and_nobody_elses(
    researcher_env: Path, sdk: Client, tmp_path: Path  # noqa: F811
) -> None:
    _held_jobs_node(researcher_env)
    digest = sdk.upload_model((FIXTURES / "logreg-20x5.json").read_bytes())
    first = sdk.submit("demo", digest, **JOB)
    second = sdk.submit("demo", digest, **JOB)
    with _client(researcher_env, "bob", tmp_path) as bob:
        theirs = bob.submit("demo", bob.upload_model((FIXTURES / "logreg-20x5.json").read_bytes()),
                            **JOB)
        assert [j.id for j in bob.jobs()] == [theirs.id]
        with pytest.raises(FedgateError) as hidden:
            bob.job(first.id)
        assert hidden.value.status == 404
    listed = sdk.jobs()
    assert [j.id for j in listed] == [second.id, first.id]
    assert {j.last_status["state"] for j in listed} == {"pending_review"}
    assert sdk.job(first.id).last_status == first.status()

    cli = _fedgate("job", "list", "--json")
    assert cli.returncode == 0, cli.stderr
    assert [s["job_id"] for s in json.loads(cli.stdout)] == [second.id, first.id]
    table = _fedgate("job", "list")
    assert table.stdout.splitlines()[0].split() == ["job", "dataset", "state", "round", "ε",
                                                    "budget"]
    assert theirs.id not in table.stdout and "waiting" not in table.stdout


def test_ctrl_c_while_waiting_leaves_the_job_running_and_says_how_to_reattach_or_cancel(
    researcher_env: Path, sdk: Client  # noqa: F811
) -> None:
    _held_jobs_node(researcher_env)
    job = sdk.submit("demo", sdk.upload_model((FIXTURES / "logreg-20x5.json").read_bytes()),
                     **JOB)
    waiting = subprocess.Popen([sys.executable, "-m", "gateway.cli", "job", "wait", job.id],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = []
    assert waiting.stderr is not None
    for line in waiting.stderr:  # plain lines: stderr is a pipe, not a terminal
        seen.append(line)
        if "waiting for review" in line:
            break
    waiting.send_signal(signal.SIGINT)
    rest = waiting.communicate(timeout=60)[1]
    err = "".join(seen) + rest
    assert waiting.returncode == 130, err
    assert f"{job.id} keeps running on the node" in err
    assert f"fedgate job wait {job.id}" in err and f"fedgate job cancel {job.id}" in err
    assert "Traceback" not in err and "\r" not in err
    assert sdk.job(job.id).last_status["state"] == "pending_review"  # still there, reserved


def test_a_job_you_cancelled_is_reported_cancelled_not_failed(
    researcher_env: Path, sdk: Client  # noqa: F811
) -> None:
    _held_jobs_node(researcher_env)
    job = sdk.submit("demo", sdk.upload_model((FIXTURES / "logreg-20x5.json").read_bytes()),
                     **JOB)
    cancelled = _fedgate("job", "cancel", job.id)
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.strip() == f"{job.id}: cancelled (budget refunded)"
    waited = _fedgate("job", "wait", job.id)
    assert waited.returncode == 1
    assert f"job {job.id} was cancelled (budget refunded)" in waited.stdout
    assert "failed" not in waited.stdout + waited.stderr
    assert "cancelled" in _fedgate("job", "status", job.id).stdout.splitlines()[0]
    with pytest.raises(JobFailed, match="was cancelled"):
        sdk.job(job.id).result()


# --- progress output --------------------------------------------------------------------------


def _status(state: str, round_: int, **extra: object) -> dict[str, object]:
    return {"job_id": "job-1", "state": state, "round": round_, "rounds": 10, "epsilon": 2.5,
            "budget": "reserved",
            "progress": {"round": round_, "rounds": 10, "epsilon_so_far": 0.25 * round_}, **extra}


def test_progress_names_the_engine_start_and_a_cancel_in_words() -> None:
    assert progress_phase(_status("queued", 0)) == "queued"
    assert progress_phase(_status("queued", 0, queue_position=2)) == "queued (position 2)"
    assert progress_phase(_status("running", 0)) == "engine starting"
    assert progress_phase(_status("running", 1)) == "running"
    assert progress_phase(_status("pending_review", 0)) == "waiting for review"
    assert progress_phase(_status("failed", 3, failure="cancelled by the researcher")) == "cancelled"
    assert progress_phase(_status("failed", 3, failure="out of memory")) == "failed"
    assert progress_postfix(_status("running", 0)) == "ε 0/2.5, engine starting"


def test_progress_in_a_pipe_is_one_plain_line_per_change_after_explaining_epsilon_so_far(
) -> None:
    out = io.StringIO()  # not a terminal
    display = progress_display("job-1", 10, stream=out)
    assert isinstance(display, ProgressLines)
    for status in (_status("queued", 0), _status("running", 0), _status("running", 0),
                   _status("running", 1), _status("running", 1), _status("running", 2),
                   _status("succeeded", 10)):
        display.update(status)
    display.close()
    lines = out.getvalue().splitlines()
    assert lines[0] == EPSILON_SO_FAR and "public parameters" in lines[0]
    assert lines[1:] == [
        "job-1: round 0/10, ε so far 0 of 2.5, queued",
        "job-1: round 0/10, ε so far 0 of 2.5, engine starting",
        "job-1: round 1/10, ε so far 0.25 of 2.5, running",
        "job-1: round 2/10, ε so far 0.5 of 2.5, running",
        "job-1: round 10/10, ε so far 2.5 of 2.5, succeeded",
    ]
    assert "\r" not in out.getvalue()


def test_progress_in_a_terminal_is_a_bar() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    display = progress_display("job-1", 10, stream=out)
    display.update(_status("running", 3))
    display.close()
    assert "\r" in out.getvalue() and "ε 0.75/2.5, running" in out.getvalue()


# --- saving the released model ----------------------------------------------------------------


@pytest.mark.tff
def test_released_model_is_saved_by_default_never_overwritten_and_reloads_in_keras(
    researcher_env: Path, sdk: Client, tmp_path: Path  # noqa: F811
) -> None:
    import numpy as np
    import tensorflow as tf

    from engine.artifact import keras_from_artifact

    job = sdk.submit("demo", sdk.upload_model((FIXTURES / "logreg-20x5.json").read_bytes()),
                     **JOB)
    assert job.wait(progress=False)["state"] == "succeeded"
    work = tmp_path / "work"
    work.mkdir()
    taken = work / "taken.json"
    taken.write_text("mine")

    refused = _fedgate("job", "result", job.id, "--out", str(taken), cwd=work)
    assert refused.returncode == 2 and "nothing was fetched" in refused.stderr
    assert taken.read_text() == "mine"
    assert "fetch" not in _ledger(researcher_env)[1]  # refused before the (counted) fetch

    first = _fedgate("job", "result", job.id, cwd=work)
    assert first.returncode == 0, first.stderr
    default = work / f"{job.id}.model.json"
    assert f"DP model saved to {default.name}" in first.stdout
    saved = default.read_text()
    again = _fedgate("job", "result", job.id, cwd=work)
    assert again.returncode == 0 and "exists and was kept" in again.stderr
    assert default.read_text() == saved

    as_keras = _fedgate("job", "result", job.id, "--out", "dp.keras", cwd=work)
    assert as_keras.returncode == 0, as_keras.stderr
    converted = _fedgate("model", "to-keras", default.name, "converted.keras", cwd=work)
    assert converted.returncode == 0, converted.stderr
    assert _fedgate("model", "to-keras", default.name, "converted.keras", cwd=work).returncode == 2

    release = sdk.job(job.id).result()
    assert "ε charged" in release._repr_html_() and job.id in release._repr_html_()
    path = release.save(work / "sdk.json")
    with pytest.raises(FileExistsError):
        release.save(path)
    for model in (keras_from_artifact(json.loads(path.read_text())),
                  keras_from_artifact(json.loads(saved)),
                  tf.keras.models.load_model(work / "dp.keras", compile=False),
                  tf.keras.models.load_model(work / "converted.keras", compile=False)):
        assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), release.weights,
                                                        strict=True))
