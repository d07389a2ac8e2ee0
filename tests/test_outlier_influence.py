"""One user's influence on the released weights is bounded by the clipping norm.

Specification (issue 8): replace one user's data by an extreme outlier — features ×1e6 and
flipped labels — and train with the engine's own code path (:func:`engine.training.
prepare_training`, :meth:`FederatedTraining.run`, real TFF DP-FedAvg). The released weights of
the two neighbouring datasets D and D' then differ by at most T·2C/(q·N) in L2 norm, whatever
the outlier holds; with clipping effectively removed (C = 1e9) the same outlier moves them by
orders of magnitude more, so the check can fail.

Why the bound is exact here, not only in expectation:

* noise multiplier 0 (a valid :class:`~engine.job.JobSpec` value: it is the accounting that
  refuses to call that private, not the engine) so both runs see the same noise, namely none;
* q = 1, so every user — the outlier included — is sampled every round and the fixed
  denominator q·N equals N;
* server SGD with learning rate 1 and no momentum, so each round adds the aggregate itself;
* the other users' local training is non-expansive: one full-batch gradient step (batch size
  ≥ examples, one local epoch) on a convex softmax regression with step 0.1 ≤ 2/L for their
  small features, and their deltas stay under C (never clipped).

Then w' ↦ (1/N)·Σ_i (w + clip(Δ_i(w))) changes by at most ‖w − w'‖ + 2C/N per round: the
other users contribute a non-expansive average and the outlier's clipped delta at most 2C.
By induction ‖w_T(D) − w_T(D')‖ ≤ T·2C/(q·N).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from engine.artifact import linear_classifier_artifact, parse_artifact, validate_artifact
from engine.datastore import Partition
from engine.job import JobSpec

pytestmark = pytest.mark.tff

USERS = 8
EXAMPLES_PER_USER = 8
FEATURES = 10
CLASSES = 3
ROUNDS = 3
CLIP = 1.0
OUTLIER = 0
TOLERANCE = 1e-5  # float32 sums in a different order (local shuffling)
UNCLIPPED = 1e9
REPOSITORY = Path(__file__).resolve().parent.parent
# Like a job: a loopback-only network namespace first (TFF's worker_binary listens on all
# interfaces without authentication), then the training; os._exit skips TF's slow teardown.
_ENTRY = ("import json, os, sys; from engine.netns import isolate_network; isolate_network(); "
          "from tests.test_outlier_influence import measure; "
          "open(sys.argv[1], 'w').write(json.dumps(measure())); os._exit(0)")


def partition(*, outlier: bool) -> Partition:
    """N users with small features; with ``outlier``, user 0's features ×1e6, labels flipped."""
    rng = np.random.default_rng(7)
    features = (0.3 * rng.standard_normal((USERS * EXAMPLES_PER_USER, FEATURES))).astype(
        np.float32)
    labels = rng.integers(0, CLASSES, USERS * EXAMPLES_PER_USER).astype(np.int32)
    if outlier:
        rows = slice(OUTLIER * EXAMPLES_PER_USER, (OUTLIER + 1) * EXAMPLES_PER_USER)
        features[rows] *= 1e6
        labels[rows] = (labels[rows] + 1) % CLASSES
    offsets = np.arange(0, USERS * EXAMPLES_PER_USER + 1, EXAMPLES_PER_USER, dtype=np.int64)
    return Partition(features=features, labels=labels, offsets=offsets)


def spec(clip: float) -> JobSpec:
    return JobSpec(
        job_id="outlier", dataset_dir=Path("/unused"), model_path=Path("/unused"),
        rounds=ROUNDS, sampling_rate=1.0, expected_clients_per_round=float(USERS),
        noise_multiplier=1.0, clip=clip, client_learning_rate=0.1, server_learning_rate=1.0,
        server_momentum=0.0, local_epochs=1, batch_size=2 * EXAMPLES_PER_USER,
        evaluation=None,
    )


def released_weights_difference(clip: float) -> float:
    """‖w_T(D) − w_T(D')‖ over all tensors, both runs from the same initial state, with the
    engine's per-user process and its aggregator's noise switched off (the audit-only switch;
    job specs refuse a zero noise multiplier), so only clipping bounds the difference."""
    import tensorflow as tf
    import tensorflow_federated as tff

    from engine.artifact import keras_from_artifact
    from engine.training import FederatedTraining, dp_aggregator, tff_optimizer

    doc = parse_artifact(json.dumps(linear_classifier_artifact(FEATURES, CLASSES)).encode())
    summary = validate_artifact(doc, num_features=FEATURES, num_classes=CLASSES)
    job = spec(clip)

    def model_fn() -> tff.learning.models.VariableModel:
        return tff.learning.models.from_keras_model(
            keras_from_artifact(doc, load_weights=False),
            loss=tf.keras.losses.SparseCategoricalCrossentropy(
                from_logits=not summary.outputs_probabilities),
            input_spec=(tf.TensorSpec([None, FEATURES], tf.float32),
                        tf.TensorSpec([None], tf.int32)))

    process = tff.learning.algorithms.build_unweighted_fed_avg(
        model_fn, client_optimizer_fn=tff_optimizer(job, "client"),
        server_optimizer_fn=tff_optimizer(job, "server"),
        model_aggregator=dp_aggregator(job, audit_noise_disabled=True))
    keras_model = keras_from_artifact(doc)
    state = process.set_model_weights(process.initialize(), tff.learning.models.ModelWeights(
        trainable=[w.numpy() for w in keras_model.trainable_weights], non_trainable=[]))
    training = FederatedTraining(process=process, state=state, spec=job, keras_model=keras_model)
    released = []
    for data in (partition(outlier=False), partition(outlier=True)):
        run = replace(training)  # same process and initial state for both datasets
        model = run.run(data, on_round=lambda _: None)
        released.append(np.concatenate([w.ravel() for w in model.get_weights()]))
    assert all(np.isfinite(w).all() for w in released)
    return float(np.linalg.norm(released[0] - released[1]))


def measure() -> dict[str, float]:
    return {"clipped": released_weights_difference(CLIP),
            "unclipped": released_weights_difference(UNCLIPPED)}


@pytest.fixture(scope="module")
def differences(tmp_path_factory: pytest.TempPathFactory) -> dict[str, float]:
    """Both measurements in one engine-like process of their own, killed as a group (with
    TFF's worker_binary, which would hold an output pipe open) when done."""
    result = tmp_path_factory.mktemp("outlier") / "differences.json"
    process = subprocess.Popen([sys.executable, "-c", _ENTRY, str(result)], cwd=REPOSITORY,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               start_new_session=True)
    try:
        process.wait(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert process.returncode == 0, process.returncode
    return json.loads(result.read_text())


def influence_bound(clip: float) -> float:
    """T·2C/(q·N): replacing one user moves each round's aggregate by at most 2C/(q·N)."""
    return ROUNDS * 2 * clip / USERS


def test_an_extreme_outlier_moves_the_released_weights_at_most_rounds_times_2c_over_qn(
        differences: dict[str, float]) -> None:
    assert differences["clipped"] <= influence_bound(CLIP) + TOLERANCE
    # The outlier does use its allowance (the bound is not met by training doing nothing): at
    # least half of one round's C/(q·N). Its softmax saturates after the first round, after
    # which its clipped delta shrinks.
    assert differences["clipped"] >= 0.5 * CLIP / USERS


def test_without_clipping_the_same_outlier_moves_the_weights_far_beyond_that_bound(
        differences: dict[str, float]) -> None:
    assert differences["unclipped"] > 100 * influence_bound(CLIP)
