"""Researcher commands of the ``fedgate`` CLI: talk to a node with signed requests.

Connection settings come from options or the environment:
``--url``/``FEDGATE_URL``, ``--key``/``FEDGATE_KEY`` (your private key from ``fedgate
keygen``) and ``--node-key``/``FEDGATE_NODE_KEY`` (the node public key the owner gave you).
Every command prints a human summary, or JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.cli.terminal import format_table
from gateway.cli.usage import add_command
from gateway.protocol.job_parameters import add_cli_options, parameters_from_cli
from gateway.protocol.job_states import shown_state
from ledger.states import JobState

if TYPE_CHECKING:
    from gateway.sdk.client import Client, Job, Release

# The SDK (httpx, numpy, cryptography) and the artifact format are imported inside the
# commands: `fedgate --help` builds this parser and should not pay for them. TensorFlow is
# imported inside `fedgate model from-keras` only: the researcher's light install may not have it.

RESEARCHER_EXAMPLES = """\
examples:
  export FEDGATE_URL=http://127.0.0.1:8620 FEDGATE_KEY=alice.key FEDGATE_NODE_KEY=node.pub
  fedgate datasets
  fedgate estimate demo --rounds 40 --clients-per-round 100 --noise-multiplier 1.0 --clip 1.0
  fedgate calibrate demo --target-epsilon 2 --rounds 40 --clients-per-round 100 --clip 1.0
  fedgate plan demo --target-epsilon 4 --parameters 610
  fedgate model from-keras model.keras model.json
  fedgate train demo --model model.json --rounds 40 --clients-per-round 100 \\
      --noise-multiplier 1.0 --clip 1.0 --rehearse      # locally on mock data; free
  fedgate train demo --model model.json --rounds 40 --clients-per-round 100 \\
      --noise-multiplier 1.0 --clip 1.0 --out weights.json
  fedgate train demo --model model.json --rounds 40 --clients-per-round 100 \\
      --noise-multiplier 1.0 --clip 1.0 --server-optimizer adam --server-learning-rate 0.01
  fedgate job list                                      # your jobs, newest first
  fedgate job status JOB_ID                             # round i/T and the ε spent so far
  fedgate job wait JOB_ID                               # reattach (e.g. after Ctrl-C)
  fedgate job result JOB_ID --out model.keras           # saved by default: JOB_ID.model.json
  fedgate model to-keras dp-model.json dp-model.keras

optimizers (a closed choice from tff.learning.optimizers; they do not change ε):
  client: sgd (default), sgdm (--client-momentum)
  server: sgd, sgdm (default; --server-momentum), adam and yogi (--server-beta-1,
          --server-beta-2, --server-epsilon), adagrad (--server-epsilon); yogi and adagrad
          also take --server-initial-preconditioner-value
"""


def _client(args: argparse.Namespace) -> Client:
    from gateway.sdk.client import Client

    url = args.url or os.environ.get("FEDGATE_URL")
    key = args.key or os.environ.get("FEDGATE_KEY")
    node_key = args.node_key or os.environ.get("FEDGATE_NODE_KEY")
    missing = [name for name, value in (("--url/FEDGATE_URL", url), ("--key/FEDGATE_KEY", key),
                                        ("--node-key/FEDGATE_NODE_KEY", node_key)) if not value]
    if missing:
        raise ValueError(f"set {', '.join(missing)} to talk to a node")
    return Client(str(url), key=Path(str(key)), node_public_key=Path(str(node_key)))


def _show(data: Any, args: argparse.Namespace, human: str) -> None:
    print(json.dumps(data, indent=2, sort_keys=True) if args.json else human)


def _verified_release(job: Job) -> Release | None:
    """The job's verified release, or None after saying on stderr why there is none (the job
    failed, or the release does not verify against the node key)."""
    from gateway.sdk.client import JobFailed, ReleaseVerificationFailed

    try:
        return job.result()
    except (JobFailed, ReleaseVerificationFailed) as exc:
        print(f"fedgate: {exc}", file=sys.stderr)
        return None


INTERRUPTED = 130
"""Exit status after Ctrl-C while waiting (128 + SIGINT); the job keeps running on the node."""


def _model_path(args: argparse.Namespace, job_id: str) -> tuple[Path, bool]:
    """Where to save a released model: ``--out``, or ``./JOB_ID.model.json`` by default; and
    whether the path was chosen explicitly."""
    return (Path(args.out), True) if args.out else (Path(f"{job_id}.model.json"), False)


def _check_out(args: argparse.Namespace) -> None:
    """Refuse an ``--out`` that could not be written before anything is spent on it."""
    from gateway.sdk.release import MODEL_SUFFIXES

    if args.out is None:
        return
    out = Path(args.out)
    if out.suffix not in MODEL_SUFFIXES:
        raise ValueError(f"--out {out}: save a model as .json (keras-json-v1) or .keras")
    if out.exists() and not args.force:
        raise FileExistsError(f"--out {out} exists; nothing was fetched. Choose another path "
                              "or add --force to overwrite it")


def _save_release(release: Release, args: argparse.Namespace) -> str | None:
    """Save the released model (``--out``, or by default ``JOB_ID.model.json``) and say where;
    an existing default file is kept (None: not written)."""
    path, explicit = _model_path(args, release.job_id)
    if path.exists() and not (explicit or args.force):
        print(f"fedgate: {path} exists and was kept (it is this job's model from an earlier "
              "fetch); --out PATH saves elsewhere, --force overwrites", file=sys.stderr)
        return None
    release.save(path, overwrite=True)  # an explicit existing --out was refused before
    return str(path)


def _released_summary(release: Release, saved: str | None) -> tuple[dict[str, Any], str]:
    summary = {"job_id": release.job_id, "epsilon": release.epsilon, "delta": release.delta,
               "metrics": release.metrics, "manifest": release.manifest, "out": saved}
    human = (f"job {release.job_id}: ε {release.epsilon:.3f} charged (δ {release.delta:g}); "
             + ", ".join(f"DP {k} {v:.3f}" for k, v in sorted(release.metrics.items()))
             + " (node signature verified)"
             + (f"; DP model saved to {saved}" if saved else ""))
    return summary, human


def _waited(job: Job, args: argparse.Namespace) -> dict[str, Any] | int:
    """Wait for ``job`` with the progress display; its final status if it succeeded, else the
    exit status: 130 on Ctrl-C (``Job.wait`` said how to reattach or cancel; the job keeps
    running), 1 if it failed or was cancelled (reported by :func:`_ended`)."""
    try:
        status = job.wait(progress=not args.json)
    except KeyboardInterrupt:
        return INTERRUPTED
    return status if status["state"] == JobState.SUCCEEDED else _ended(status, args)


def _ended(status: dict[str, Any], args: argparse.Namespace) -> int:
    """Report a job that ended without success (failed or cancelled); exit status 1."""
    state = shown_state(status)
    human = (f"job {status['job_id']} was cancelled (budget {status['budget']})"
             if state == "cancelled" else f"job {status['job_id']} failed: {status.get('failure')}")
    _show(status, args, human)
    return 1


def dataset_line(d: dict[str, Any]) -> str:
    """One dataset of ``fedgate datasets``: its public facts and, once you ran a job on it,
    about how many more jobs like your last one its budget admits."""
    line = (f"{d['name']}: N̂ = {d['public_users']} training users ({d['public_users_source']}), "
            f"≤ {d['max_examples_per_user']} examples per user and round, "
            f"{d['num_features']} features, "
            f"{d['num_classes']} classes; budget ε={d['epsilon_total']:g}, δ={d['delta']:g}")
    like = d.get("more_like_your_last_job")
    if like is not None:
        line += (f"; remaining: about {like['jobs_that_fit']} more jobs like your last "
                 f"({like['job_id']})")
    return line


def cmd_datasets(args: argparse.Namespace) -> int:
    with _client(args) as client:
        datasets = client.datasets()
    human = "\n".join(map(dataset_line, datasets)) or "no datasets visible to this key"
    _show(datasets, args, human)
    return 0


def cmd_estimate(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.estimate(args.dataset, **parameters_from_cli(args))
    human = (f"ε {result['epsilon']:.3f} at δ {result['delta']:g} (RDP); "
             f"fits now: {'yes' if result['fits'] else 'no'}; "
             f"jobs like this that fit: {result['jobs_that_fit']}")
    if "suggestion" in result:
        human += f"\nto fit: {result['suggestion']}"
    if "cost" in result:
        cost = result["cost"]
        human += f"\nprojected cost: {cost['total']} {cost['currency']} ({cost['basis']})"
    _show(result, args, human)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    parameters = parameters_from_cli(args)
    solve_for = "rounds" if "noise_multiplier" in parameters else "noise_multiplier"
    with _client(args) as client:
        result = client.calibrate(args.dataset, target_epsilon=args.target_epsilon,
                                  solve_for=solve_for, **parameters)
    human = (f"{solve_for} = {result[solve_for]:g} gives ε {result['epsilon']:.3f} at "
             f"δ {result['delta']:g}; fits now: {'yes' if result['fits'] else 'no'}")
    _show(result, args, human)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    options = {name: getattr(args, name) for name in ("parameters", "client_updates", "clip")
               if getattr(args, name) is not None}
    with _client(args) as client:
        result = client.plan(args.dataset, target_epsilon=args.target_epsilon,
                             evaluate=not args.no_evaluation, **options)
    job = result["job"]
    flags = " ".join(f"--{name.replace('_', '-')} {value:g}" if isinstance(value, float)
                     else f"--{name.replace('_', '-')} {value}"
                     for name, value in job.items()
                     if name not in ("dataset", "evaluate") and value is not None)
    human = "\n".join([*result["plan"]["explanation"],
                       f"fits now: {'yes' if result['estimate']['fits'] else 'no'} (ε "
                       f"{result['estimate']['epsilon']:.3f} with DP evaluation)",
                       f"train it: fedgate train {args.dataset} --model MODEL {flags}"])
    _show(result, args, human)
    return 0


def cmd_rehearse(args: argparse.Namespace) -> int:
    """``fedgate train --rehearse``: the job runs locally on the mock data; nothing is
    uploaded, reserved or audited on the node."""
    from engine.artifact import parse_artifact

    artifact = parse_artifact(Path(args.model).read_bytes())
    with _client(args) as client:
        report = client.rehearse(artifact, args.dataset, **parameters_from_cli(args))
    human = f"rehearsal of {args.dataset}: {report.summary()}"
    if report.engine_log:
        human += "\nengine log (mock data):\n" + report.engine_log
    _show({**asdict(report), "seconds_per_round": report.seconds_per_round}, args, human)
    return 0 if report.ok else 1


def cmd_train(args: argparse.Namespace) -> int:
    if args.rehearse:
        return cmd_rehearse(args)
    from engine.artifact import parse_artifact
    from gateway.sdk.client import NodeDocumentInvalid

    _check_out(args)
    artifact = parse_artifact(Path(args.model).read_bytes())
    with _client(args) as client:
        try:
            client.node()  # a wrong node key must cost no ε: found before anything is sent
        except NodeDocumentInvalid as exc:
            print(f"fedgate: error: {exc}", file=sys.stderr)
            return 2
        digest = client.upload_model(artifact)
        job = client.submit(args.dataset, digest, **parameters_from_cli(args))
        print(f"submitted {job.id} (ε {job.last_status['epsilon']:.3f})"
              + ("" if args.no_wait else "; waiting"), file=sys.stderr)
        if "review" in job.last_status:
            print(f"{job.id} waits for the data owner's review (budget reserved): "
                  f"{job.last_status['review']['required_because']}", file=sys.stderr)
        if args.no_wait:
            _show(job.last_status, args, f"job {job.id} is {job.last_status['state']}")
            return 0
        status = _waited(job, args)
        if isinstance(status, int):
            return status
        release = _verified_release(job)
        if release is None:
            return 1
    summary, human = _released_summary(release, _save_release(release, args))
    _show(summary, args, human)
    return 0


def _job_table(jobs: list[Job]) -> str:
    if not jobs:
        return "no jobs submitted with this key"
    return format_table([{"job": j.id, "dataset": j.last_status["dataset"],
                          "state": shown_state(j.last_status),
                          "round": f"{j.last_status['round']}/{j.last_status['rounds']}",
                          "ε": f"{j.last_status['epsilon']:.3f}", "budget": j.last_status["budget"]}
                         for j in jobs])


def cmd_job(args: argparse.Namespace) -> int:
    from gateway.sdk.client import Job

    if args.action == "list":
        with _client(args) as client:
            jobs = client.jobs()
        _show([j.last_status for j in jobs], args, _job_table(jobs))
        return 0
    if args.job_id is None:
        raise ValueError(f"fedgate job {args.action} needs a JOB_ID (fedgate job list shows "
                         "yours)")
    if args.action == "result":
        _check_out(args)
    with _client(args) as client:
        job = Job(client, {"job_id": args.job_id, "rounds": 0, "state": "unknown"})
        if args.action == "wait":
            job = client.job(args.job_id)
            status = _waited(job, args)
            if isinstance(status, int):
                return status
            _show(status, args, f"job {job.id} succeeded (ε {status['epsilon']:.3f}); fetch "
                                f"and save the model: fedgate job result {job.id}")
        elif args.action == "status":
            status = job.status()
            human = (f"{status['job_id']}: {shown_state(status)}, round {status['round']}"
                     f"/{status['rounds']}, ε so far "
                     f"{status['progress']['epsilon_so_far']:.3f} of {status['epsilon']:.3f}")
            if "review" in status:
                review = status["review"]
                human += (f"\n  review {review['state']}: "
                          f"{review['reason'] or review['required_because']}")
            if "queue_position" in status:
                human += f"\n  waiting for a free slot: position {status['queue_position']}"
            if "failure" in status:
                human += f"\n  failure: {status['failure']}"
            _show(status, args, human)
        elif args.action == "cancel":
            status = job.cancel()
            _show(status, args, f"{status['job_id']}: {shown_state(status)} "
                                f"(budget {status['budget']})")
        else:
            job.status()
            release = _verified_release(job)
            if release is None:
                return 1
            summary, human = _released_summary(release, _save_release(release, args))
            _show(summary, args, human)
    return 0


def cmd_model_to_keras(args: argparse.Namespace) -> int:
    """A keras-json-v1 artifact (e.g. a released model) as a Keras ``.keras`` file."""
    from engine.artifact import parse_artifact
    from gateway.sdk.release import write_model

    out = Path(args.output)
    if out.suffix != ".keras":
        raise ValueError(f"{out}: the output of to-keras is a .keras file")
    write_model(parse_artifact(Path(args.source).read_bytes()), out, overwrite=args.force)
    print(f"wrote Keras model {out}")
    return 0


def _quiet_tensorflow() -> None:
    """Before TensorFlow's first import in this process: level 3 keeps its C++ start-up errors
    (``E ... Unable to register cuDNN/cuFFT/cuBLAS factory`` on a machine without a GPU) out of
    the researcher's output. A TF_CPP_MIN_LOG_LEVEL already set wins."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def cmd_model_from_keras(args: argparse.Namespace) -> int:
    _quiet_tensorflow()
    import tensorflow as tf

    from engine.artifact import artifact_from_keras

    model = tf.keras.models.load_model(args.source, compile=False)
    artifact = artifact_from_keras(model)
    Path(args.output).write_text(json.dumps(artifact))
    _show({"output": args.output, "format": artifact["format"],
           "parameters": model.count_params()},
          args, f"wrote keras-json-v1 artifact {args.output} ({model.count_params()} parameters)")
    return 0


def _connection_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help="node URL (or FEDGATE_URL)")
    parser.add_argument("--key", help="your private key file (or FEDGATE_KEY)")
    parser.add_argument("--node-key", help="the node's public key file (or FEDGATE_NODE_KEY)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the researcher commands to the top-level parser."""
    p = add_command(commands, "datasets", help="list datasets you may use",
                    examples=RESEARCHER_EXAMPLES)
    _connection_options(p)
    p.set_defaults(func=cmd_datasets)

    p = add_command(commands, "estimate", help="ε of a proposed job and whether it fits (free)",
                    examples=RESEARCHER_EXAMPLES)
    add_cli_options(p)
    _connection_options(p)
    p.set_defaults(func=cmd_estimate)

    p = add_command(commands, "calibrate", help="noise (or rounds) for a target ε; omit the one "
                    "to solve for",
                    examples=RESEARCHER_EXAMPLES)
    add_cli_options(p, optional=("rounds", "noise_multiplier"))
    p.add_argument("--target-epsilon", type=float, required=True,
                   help="the ε (at the dataset's δ) the job should spend")
    _connection_options(p)
    p.set_defaults(func=cmd_calibrate)

    p = add_command(commands, "plan", help="the node proposes clients per round, noise, rounds "
                    "and clip strategy for a target ε, and explains why (free)",
                    examples=RESEARCHER_EXAMPLES)
    p.add_argument("dataset", help="the dataset to plan for (`fedgate datasets`)")
    p.add_argument("--target-epsilon", type=float, required=True,
                   help="the ε (at the dataset's δ) the job should spend")
    p.add_argument("--parameters", type=int, help="your model's parameter count")
    p.add_argument("--client-updates", type=int,
                   help="compute budget: rounds × clients per round (default 1,000,000)")
    p.add_argument("--clip", type=float, help="the (initial) clip (default 0.1)")
    p.add_argument("--no-evaluation", action="store_true", help="plan without DP evaluation")
    _connection_options(p)
    p.set_defaults(func=cmd_plan)

    p = add_command(commands, "train", help="train a model under user-level DP and fetch it",
                    examples=RESEARCHER_EXAMPLES)
    add_cli_options(p)
    p.add_argument("--model", required=True, help="keras-json-v1 artifact (fedgate model "
                   "from-keras makes one)")
    p.add_argument("--out", help="save the released DP model here: .json (keras-json-v1) or "
                   ".keras (needs TensorFlow); default ./JOB_ID.model.json")
    p.add_argument("--force", action="store_true", help="overwrite an existing --out file")
    p.add_argument("--no-wait", action="store_true", help="submit and return the job id")
    p.add_argument("--rehearse", action="store_true", help="run the job locally on the "
                   "dataset's mock data instead (needs TFF; reserves nothing on the node)")
    _connection_options(p)
    p.set_defaults(func=cmd_train)

    p = add_command(commands, "job", help="list your jobs; status, wait for, result (saved) or "
                    "cancel one",
                    examples=RESEARCHER_EXAMPLES)
    p.add_argument("action", choices=("list", "status", "wait", "result", "cancel"), help="what to do")
    p.add_argument("job_id", nargs="?", help="the job (all but list)")
    p.add_argument("--out", help="result: save the DP model here, .json or .keras (default "
                   "./JOB_ID.model.json, never overwritten)")
    p.add_argument("--force", action="store_true", help="result: overwrite an existing file")
    _connection_options(p)
    p.set_defaults(func=cmd_job)

    group = add_command(commands, "model", help="prepare model artifacts",
                        examples=RESEARCHER_EXAMPLES)
    sub = group.add_subparsers(dest="model_action", required=True, metavar="ACTION")
    p = add_command(sub, "from-keras", help="convert a saved Keras model to keras-json-v1",
                    examples=RESEARCHER_EXAMPLES)
    p.add_argument("source", help="a .keras or .h5 model file")
    p.add_argument("output", help="artifact JSON to write")
    p.add_argument("--json", action="store_true", help="print what was written as JSON")
    p.set_defaults(func=cmd_model_from_keras)
    p = add_command(sub, "to-keras", help="convert a keras-json-v1 artifact (e.g. a released "
                    "model) to a .keras file (needs TensorFlow)",
                    examples=RESEARCHER_EXAMPLES)
    p.add_argument("source", help="keras-json-v1 artifact JSON")
    p.add_argument("output", help="the .keras file to write")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(func=cmd_model_to_keras)
