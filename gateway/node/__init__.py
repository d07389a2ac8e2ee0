"""The node's services: everything a node decides and runs, behind the HTTP API and the CLI.

``node`` (``Node``: deployment, configuration, ledger engine, node key, policy) and
``deployment`` (the deployment directory and ``fedgate.toml``); ``identity`` (who is asking);
``admission`` (validate, policy, privacy filter, audit), ``quotas`` and ``billing``; the job
runner: ``jobs``, ``scheduler``, ``background``, ``release`` (the release gate and the signed
manifest) and ``output_policy``; ``review`` (owner review); ``audit`` (the node's audit-log
operations); ``rehearsal`` (a job run locally on a dataset's mock data, for the SDK);
``decision_log`` (the gateway log's line per admission, refusal and completion of a job).

Nothing here imports the API (``gateway.api``), the dashboard or the CLI.
"""
