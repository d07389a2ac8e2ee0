"""One table of job parameters (``gateway.protocol.job_parameters``) is the source of the
request schema, the CLI's options, the federation's per-node fields and the reference page."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from gateway.api.openapi import openapi_document
from gateway.cli import build_parser
from gateway.federation.core import LOCAL_JOB_FIELDS, REQUIRED_JOB_FIELDS
from gateway.node.admission import JobRequest
from gateway.protocol.job_parameters import (
    PARAMETERS,
    REQUIRED,
    markdown,
    parameters_from_cli,
)

DOCS = Path(__file__).resolve().parent.parent / "docs"
ENVELOPE = {"model_digest", "idempotency_key"}  # a job request's own fields, not parameters


def test_job_request_has_the_tables_fields_defaults_and_required_set() -> None:
    fields = {f.name: f for f in dataclasses.fields(JobRequest)}
    assert set(fields) - ENVELOPE == {p.name for p in PARAMETERS}
    for p in PARAMETERS:
        field = fields[p.name]
        if p.required:
            assert field.default is dataclasses.MISSING, p.name
        else:
            assert field.default == p.default, p.name
    assert set(REQUIRED) == {n for n, f in fields.items() if f.default is dataclasses.MISSING
                             } - {"model_digest"}


def test_openapi_request_schemas_are_the_tables() -> None:
    schemas = openapi_document()["components"]["schemas"]
    for name in ("JobRequest", "EstimateRequest"):
        properties = schemas[name]["properties"]
        assert {k: v for k, v in properties.items() if k not in ENVELOPE} == {
            p.name: p.schema() for p in PARAMETERS}
    assert set(schemas["EstimateRequest"]["required"]) == set(REQUIRED)
    assert set(schemas["JobRequest"]["required"]) == {*REQUIRED, "model_digest"}


def _subcommand(name: str) -> argparse.ArgumentParser:
    commands = next(a for a in build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction))
    return commands.choices[name]


def test_cli_options_are_the_tables_and_send_only_what_was_given() -> None:
    for command in ("estimate", "train", "calibrate"):
        options = {a.dest: a for a in _subcommand(command)._actions}
        for p in PARAMETERS:
            assert p.name in options, (command, p.name)
            if p.name != "dataset":
                assert p.flag in options[p.name].option_strings
                assert tuple(options[p.name].choices or ()) == p.choices
    args = _subcommand("estimate").parse_args(
        ["demo", "--rounds", "3", "--clients-per-round", "20", "--noise-multiplier", "1",
         "--clip", "0.5", "--server-optimizer", "adam", "--no-evaluation"])
    assert parameters_from_cli(args) == {"rounds": 3, "clients_per_round": 20.0,
                                         "noise_multiplier": 1.0, "clip": 0.5,
                                         "server_optimizer": "adam", "evaluate": False}


def test_federation_sends_every_parameter_but_the_dataset_and_evaluation() -> None:
    assert {p.name for p in PARAMETERS} - {"dataset", "evaluate"} == LOCAL_JOB_FIELDS
    assert REQUIRED_JOB_FIELDS == ("rounds", "clients_per_round", "noise_multiplier", "clip")


def test_reference_page_is_generated_from_the_table() -> None:
    assert (DOCS / "job-parameters.md").read_text() == markdown(), \
        "regenerate with `make openapi`"


def test_the_engines_job_spec_has_the_tables_defaults_for_the_fields_it_shares() -> None:
    """engine.job.JobSpec (the job.json contract; the engine never imports gateway) declares
    the optimizer and clip-strategy fields again: their defaults must be the table's (the
    adaptive-only fields are None in a fixed-clip job.json, whatever the request's default)."""
    from engine.job import ADAPTIVE_FIELDS, JobSpec

    table = {p.name: p for p in PARAMETERS}
    shared = [f for f in dataclasses.fields(JobSpec)
              if f.name in table and f.default is not dataclasses.MISSING
              and f.name not in ADAPTIVE_FIELDS]
    assert all(f.default is None for f in dataclasses.fields(JobSpec)
               if f.name in ADAPTIVE_FIELDS)
    assert {f.name for f in shared} >= {"client_optimizer", "client_momentum",
                                         "server_optimizer", "server_beta_1"}
    assert {f.name: f.default for f in shared} == {f.name: table[f.name].default
                                                   for f in shared}
