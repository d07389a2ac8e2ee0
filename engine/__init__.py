"""fedgate's engine: validates model artifacts, stores per-user data, runs DP-FedAvg jobs.

TensorFlow-free modules (imported by the gateway): ``artifact`` (model format, allowlist
checks via ``keras_config``), ``datastore`` (per-user storage), ``job`` (job directory
contract), ``launcher`` (runs a job in its own process group). Job-side modules: ``runner``
(entry point, ``python -m engine.runner JOB_DIR``), ``netns``, ``training`` (TFF DP-FedAvg),
``dp_evaluation``.
"""

import os as _os

# TFF's worker_binary (the process that runs every TFF computation: a job's rounds, remote
# workers, the privacy audit) starts from this process's environment and, unlike TensorFlow's
# Python runtime, leaves oneDNN's CPU kernels off unless this is set: the vectorized CNN round
# runs 1.7x faster with them (docs/performance.md). Set before any TFF context starts, here
# because every process that starts one imports ``engine`` first; an operator's explicit
# setting wins.
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
