"""Run one job: ``python -m engine.runner JOB_DIR`` (its own process; the gateway never imports
TensorFlow).

Order of operations, which the budget refund rule depends on:

1. make sure the process is in a loopback-only network namespace (:mod:`engine.netns`): in
   the bubblewrap sandbox it already is and this only checks it; with ``sandbox = "none"``
   the runner unshares one itself; a process that still sees another interface refuses to run;
2. validate ``job.json`` (every parameter in its float32 range, ``ledger.mechanism``; the
   mechanism it describes equal to the charged event, ``JobSpec.check_charged``) and the
   model artifact; with remote workers (``FEDGATE_REMOTE_WORKERS``,
   set by the launcher: gRPC targets of its relay) make sure every worker answers and run all
   TFF computations on them (:func:`use_remote_workers`); build the Keras model and the TFF
   process — no user data is read (``schema.json`` is dataset metadata the gateway already
   publishes), so a job whose workers are down fails here and is refunded;
3. create ``JOB_DIR/data_access`` (fsynced) and emit ``{"event": "data_access"}``;
4. only then open the partitions: DP-FedAvg training, then DP evaluation on held-out users;
5. write ``JOB_DIR/release.json`` = ``{"weights": [...], "metrics": {...}}`` atomically and emit
   ``{"event": "done"}``.

Released: the final DP weights and, if requested, DP accuracy/loss. Nothing else leaves the job:
no TFF metrics, no counts. Progress lines go to the fd in ``FEDGATE_PROGRESS_FD`` (default:
the original stdout; anything else written to stdout then goes to stderr). Errors are reported
on stderr as phase, exception type and code locations only — exception messages can quote data
values, so only this package's own validation messages are printed.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import traceback
from pathlib import Path
from typing import IO, Any

from engine.job import (
    DATA_ACCESS_EVENT,
    DATA_ACCESS_MARKER,
    DONE_EVENT,
    EVALUATION_EVENT,
    PROGRESS_FD_ENV,
    RELEASE_FILE,
    JobSpec,
    JobSpecInvalid,
    format_event,
    round_event,
)
from engine.keras_config import ModelRejected
from engine.meter import COUNTS_FILE
from engine.netns import NetworkIsolationError, isolate_network
from engine.sandbox import REMOTE_WORKERS_ENV

EXIT_REJECTED = 2
EXIT_FAILED = 1
WORKER_READY_TIMEOUT_S = 30.0
_GRPC_MAX_MESSAGE_BYTES = 2 * 1000 * 1000 * 1000  # as TFF's own channels to its worker


class RemoteWorkersUnavailable(RuntimeError):
    """A remote worker did not answer before training began (no data was read)."""


class ProgressChannel:
    """The write end of the progress pipe; carries only :mod:`engine.job` event lines."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream

    @classmethod
    def from_environment(cls) -> ProgressChannel:
        value = os.environ.get(PROGRESS_FD_ENV)
        if value is None:
            # Keep stdout for progress only: move the original stdout to a new fd and point
            # fd 1 (and with it TF, TFF and the worker binary) at stderr.
            fd = os.dup(1)
            os.dup2(2, 1)
        else:
            fd = int(value)
        os.set_inheritable(fd, False)  # never leaks into worker_binary
        return cls(os.fdopen(fd, "wb", buffering=0))

    def emit(self, event: dict[str, Any]) -> None:
        self._stream.write(format_event(event))


def run_job(job_dir: Path, progress: ProgressChannel) -> None:
    """Validate, train, evaluate and release. Raises on any failure."""
    spec = JobSpec.load(job_dir)
    if (job_dir / DATA_ACCESS_MARKER).exists() or (job_dir / RELEASE_FILE).exists():
        # A second run would use the data again under a single budget charge.
        raise JobSpecInvalid("job directory has already been run")

    from engine import artifact, datastore

    # What runs must be what was charged: q, z, T and the evaluation noise rebuild exactly
    # the stored cost event (the parameters' float32 ranges were checked when parsing).
    spec.check_charged()
    schema = datastore.load_schema(spec.dataset_dir)
    doc = artifact.parse_artifact(spec.model_path.read_bytes())
    summary = artifact.validate_artifact(doc, num_features=schema.num_features,
                                         num_classes=schema.num_classes)
    spec.check_memory(summary)  # public inputs only; over the node's limit: refunded

    _quiet_tensorflow()
    targets = [t for t in os.environ.get(REMOTE_WORKERS_ENV, "").split(",") if t]
    if targets:
        use_remote_workers(targets)
    training = build_training(doc, spec, workers=len(targets), scratch_dir=job_dir / "shards")

    _write_durably(job_dir / DATA_ACCESS_MARKER, spec.job_id.encode())
    progress.emit(DATA_ACCESS_EVENT)

    partition = datastore.open_partition(spec.dataset_dir, "training")
    model = training.run(
        partition, on_round=lambda i: progress.emit(round_event(i, spec.rounds))
    )
    # Owner-local metering only (engine.meter.read_counts); the release never carries it.
    _write_durably(job_dir / COUNTS_FILE, json.dumps({"client_updates": training.client_updates})
                   .encode())
    metrics: dict[str, float] = {}
    if spec.evaluation is not None:
        from engine.dp_evaluation import evaluate_privately

        metrics = evaluate_privately(
            model,
            datastore.open_partition(spec.dataset_dir, "evaluation"),
            from_logits=not summary.outputs_probabilities,
            noise_multiplier=spec.evaluation.noise_multiplier,
            loss_clip=spec.evaluation.loss_clip,
        )
        progress.emit(EVALUATION_EVENT)

    release = {"weights": [artifact.encode_array(w) for w in model.get_weights()],
               "metrics": metrics}
    _write_durably(job_dir / RELEASE_FILE, json.dumps(release).encode())
    progress.emit(DONE_EVENT)


def build_training(doc: dict[str, Any], spec: JobSpec, *, workers: int = 0,
                   scratch_dir: Path | None = None) -> Any:
    """The job's training process (:mod:`engine.shard_process`: shards of users as TFF
    clients, every user padded to the owner's cap); reads no user data.

    Raises :class:`JobSpecInvalid` — before any data is read, so the job is refunded — when the
    job has no per-user cap or the model has a layer or option the vectorized engine does not
    run (the gateway refuses both at admission; the per-user path, ``engine.training``, is only
    the reference implementation for tests, benchmarks and the privacy audit). With remote
    workers, each round has at least one shard per worker and the shards travel inside TFF; on
    the local runtime they are written to ``scratch_dir`` (in the job directory, each deleted
    when its round ends) and read back by the worker, which is twice as fast.
    """
    from engine.functional_model import vectorizable
    from engine.shard_process import prepare_sharded_training

    if spec.max_examples_per_user is None:
        raise JobSpecInvalid("job.json has no max_examples_per_user: the engine pads every "
                             "user to the owner's cap")
    unsupported = vectorizable(doc["config"])
    if unsupported is not None:
        raise JobSpecInvalid(f"the engine cannot train this model: {unsupported}")
    local = scratch_dir if not workers and scratch_dir is not None else None
    if local is not None:
        local.mkdir(exist_ok=True)
    return prepare_sharded_training(doc, spec, cap=spec.max_examples_per_user,
                                    min_shards=max(1, workers), scratch_dir=local)


def use_remote_workers(targets: list[str], timeout_s: float = WORKER_READY_TIMEOUT_S) -> None:
    """Run every TFF computation of this process on the remote workers at ``targets``.

    TFF 0.87's multi-worker runtime is the mergeable-computation context: each round's client
    list is split into one subround per worker; each worker trains its share of the sampled
    users and sums their clipped deltas (``up_to_merge``), the partial sums are added
    (``merge``) and the server step — noise on the sum, the fixed denominator, the optimizer —
    runs once on the total (``after_merge``). So the DP mechanism is the same as with the local
    runtime: per-user clipping, one draw of noise on the full sum, division by q·N. No local
    ``worker_binary`` is started. Raises :class:`RemoteWorkersUnavailable` if a worker does not
    complete a gRPC handshake within ``timeout_s`` (before any data is read).
    """
    import grpc
    import tensorflow_federated as tff

    options = [("grpc.max_message_length", _GRPC_MAX_MESSAGE_BYTES),
               ("grpc.max_receive_message_length", _GRPC_MAX_MESSAGE_BYTES),
               ("grpc.max_send_message_length", _GRPC_MAX_MESSAGE_BYTES)]
    contexts = []
    for index, target in enumerate(targets):
        channel = grpc.insecure_channel(target, options)
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout_s)
        except grpc.FutureTimeoutError:
            raise RemoteWorkersUnavailable(
                f"remote worker {index} did not answer within {timeout_s:g} s") from None
        stub = tff.framework.RemoteExecutorGrpcStub(channel)

        def executor(cardinalities: dict[Any, int], stub: Any = stub) -> Any:
            cardinalities.setdefault(tff.CLIENTS, 0)  # as TFF's local factory does
            remote = tff.framework.RemoteExecutor(stub)
            remote.set_cardinalities(cardinalities)
            return remote

        contexts.append(tff.framework.AsyncExecutionContext(
            executor_fn=tff.framework.ResourceManagingExecutorFactory(executor),
            compiler_fn=tff.backends.native.desugar_and_transform_to_native,
            transform_args=tff.tensorflow.transform_args,
            transform_result=tff.tensorflow.transform_result,
        ))
    tff.backends.native.set_mergeable_comp_execution_context(contexts)


def _quiet_tensorflow() -> None:
    """TF/TFF log to stderr; keep that to errors (it never needs data values)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import absl.logging
    import tensorflow as tf

    absl.logging.set_verbosity(absl.logging.ERROR)
    tf.get_logger().setLevel("ERROR")


def _write_durably(path: Path, data: bytes) -> None:
    """Write ``path`` atomically (temp file + rename) and fsync the file and its directory."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _report(error: BaseException) -> None:
    """Data-free failure report for the owner's local log: this package's own messages are
    shown; others' (TensorFlow's can quote tensor values) are reduced to their type."""
    detail = f": {error}" if type(error).__module__.startswith("engine.") else ""
    print(f"engine: job failed: {type(error).__name__}{detail}", file=sys.stderr)
    for frame in traceback.extract_tb(error.__traceback__):
        print(f"  at {frame.filename}:{frame.lineno} in {frame.name}", file=sys.stderr)


def _reap_children() -> None:
    """Kill and reap our own children (TFF's worker_binary) so none outlives the job."""
    me = str(os.getpid())
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                parent = f.read().rsplit(")", 1)[1].split()[1]
        except (OSError, IndexError):
            continue
        if parent == me:
            try:
                os.kill(int(entry.name), signal.SIGKILL)
                os.waitpid(int(entry.name), 0)
            except (ProcessLookupError, ChildProcessError):
                pass


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m engine.runner JOB_DIR", file=sys.stderr)
        return EXIT_REJECTED
    progress = ProgressChannel.from_environment()
    try:
        isolate_network()  # first: the process is still single-threaded
        run_job(Path(argv[1]), progress)
    except BaseException as error:  # every failure becomes an exit status and a local report
        _report(error)
        rejected = isinstance(error, JobSpecInvalid | ModelRejected | NetworkIsolationError)
        return EXIT_REJECTED if rejected else EXIT_FAILED
    return 0


if __name__ == "__main__":
    code = main(sys.argv)
    _reap_children()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: TF/TFF finalizers can block, and the worker is already gone.
    os._exit(code)
