"""What an outsider can learn or make the gateway do, beyond the signature layer (issue 22, low).

Each test is named after the attack it stops; each was reproduced against the gateway before:

* a ``Host`` header reflected into the dashboard's slash redirect (307 to any host);
* a cross-site form POST signing a browser into the dashboard (login CSRF);
* the officer's one-time sign-in token written to the access log (``?token=``);
* a stranger telling hidden datasets (403) from missing ones (404).
"""

from __future__ import annotations

import logging
from pathlib import Path

from starlette.testclient import TestClient

from gateway.api.access_log import RedactSecrets
from gateway.api.app import create_app
from tests.conftest import make_researcher
from tests.ledger_activity import login_token
from tests.test_audit_api import make_officer
from tests.test_gateway import JOB, audit_entries, signed_client
from tests.test_review import submit


def test_a_host_header_is_never_reflected_into_a_redirect(node_dir: Path) -> None:
    with TestClient(create_app(node_dir)) as browser:
        response = browser.get("/dashboard/", headers={"Host": "evil.example"},
                               follow_redirects=False)
    assert response.status_code == 404
    assert "evil.example" not in response.headers.get("location", "")


def test_a_cross_site_form_cannot_sign_a_browser_into_the_dashboard(node_dir: Path) -> None:
    make_officer(node_dir)
    issued = login_token(node_dir)
    with TestClient(create_app(node_dir), base_url="http://node.test") as browser:
        forged = browser.post("/dashboard/login", data={"token": issued.token},
                              headers={"Origin": "https://evil.example"})
        assert forged.status_code == 403 and "cross-site" in forged.json()["detail"]
        assert "set-cookie" not in forged.headers
        own = browser.post("/dashboard/login", data={"token": issued.token},
                           headers={"Origin": "http://node.test"})
    assert own.status_code == 200  # the token was not spent by the forged post


def test_the_officer_sign_in_token_never_reaches_the_access_log(node_dir: Path) -> None:
    create_app(node_dir)  # installs the filter on uvicorn's access logger
    access = logging.getLogger("uvicorn.access")
    assert any(isinstance(f, RedactSecrets) for f in access.filters)
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1,
                               '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5000", "GET", "/dashboard/login?token=s3cr3t&x=1",
                                "1.1", 200), None)
    for log_filter in access.filters:
        log_filter.filter(record)
    line = record.getMessage()
    assert "s3cr3t" not in line and "token=REDACTED&x=1" in line


def test_a_stranger_cannot_tell_a_hidden_dataset_from_a_missing_one(node_dir: Path,
                                                                  db_url: str) -> None:
    mallory = make_researcher(node_dir, "mallory", group="strangers")  # no grant anywhere
    with signed_client(create_app(node_dir), mallory) as client:
        hidden = client.post("/v1/estimate", json=JOB)
        missing = client.post("/v1/estimate", json={**JOB, "dataset": "nope"})
        hidden_job = submit(client, JOB)
        missing_job = submit(client, {**JOB, "dataset": "nope"})
        hidden_mock = client.get("/v1/datasets/demo/mock")
        missing_mock = client.get("/v1/datasets/nope/mock")
    for seen, unseen in ((hidden, missing), (hidden_job, missing_job),
                         (hidden_mock, missing_mock)):
        assert seen.status_code == unseen.status_code == 404
        assert seen.json()["detail"].replace("demo", "X") == \
            unseen.json()["detail"].replace("nope", "X")
    denied = [e for e in audit_entries(db_url) if e["action"] == "deny"]
    assert any(e["reason"] == "policy-denied" for e in denied)  # the owner still sees why
