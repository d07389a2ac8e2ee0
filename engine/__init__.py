"""fedgate's engine: validates model artifacts, stores per-user data, runs DP-FedAvg jobs.

TensorFlow-free modules (imported by the gateway): ``artifact`` (model format, allowlist
checks via ``keras_config``), ``datastore`` (per-user storage), ``job`` (job directory
contract), ``launcher`` (runs a job in its own process group). Job-side modules: ``runner``
(entry point, ``python -m engine.runner JOB_DIR``), ``netns``, ``training`` (TFF DP-FedAvg),
``dp_evaluation``.
"""
