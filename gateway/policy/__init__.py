"""Owner policy: validated rows in, explainable ``PolicyDecision`` out.

Rows (``policies/policy.csv``, one per line, ``#`` starts a comment line)::

    p,  SUBJECT, DOMAIN, DATASET, ACTION, allow|deny             grant or forbid an action
    g,  MEMBER, GROUP, DOMAIN                                    group membership
    p2, SUBJECT, DOMAIN, DATASET, ACTION|*, CONSTRAINT, VALUE    constrain matching requests

A ``p2`` row names either a *constraint* (``CONSTRAINTS``: it can refuse a request) or an
*obligation* (``OBLIGATIONS``: it never refuses; it attaches a duty to an allowed ``train``
request — hold the job for owner review, or limit how its result is released).

Contract:

* Rows are data. Names follow ``ledger.names`` (the grammar of every principal, group,
  domain and dataset name); a dataset is a name or a prefix glob ending in ``*``; actions
  and effects come from fixed lists; a constraint's value is parsed by the registered parser
  of its constraint into a typed value (finite numbers, known units, ISO dates, time
  windows). Anything else is refused at load time, so no policy text ever reaches an
  expression evaluator.
* A row *matches* a request when its subject is the requester or one of the requester's
  groups in the row's domain (transitively, at most ``MAX_GROUP_NESTING`` levels), its
  domain is the request's, its dataset equals the request's or is a prefix of it ending in
  ``*``, and its action equals the request's (``p2`` rows may use ``*``): the matchers of
  ``policies/model.conf``. Domains never mix: a row of owner A never matches on owner B.
* A request is allowed iff some ``p`` allow row matches, no ``p`` deny row matches (deny
  overrides) and every matching ``p2`` constraint holds. Constraints only restrict; they
  never grant. Anything else is a denial (fail closed).
* A constraint compares one or more facts of the request (``RequestContext``). A fact the
  request does not state is not compared, except for ``train``, which must state every fact
  a matching constraint reads: an unstated fact denies a ``train`` request.
* Obligations only add duties to an allowed request, never grant or refuse. A ``train``
  request is held for review iff some matching ``require_review`` row's condition holds; a
  condition whose facts are unstated holds (fail safe: the owner looks). A result's output
  policy is the strictest of the matching ``max_result_fetches`` / ``result_available_days``
  rows (``OutputPolicy``).
* Quotas (``max_concurrent_jobs``, ``max_cpu_hours_per_month``, ``max_spend_per_month``) are
  obligations the policy cannot decide alone: they compare a limit with the ledger's current
  use. ``PolicyEngine.quotas`` lists the matching ones (``Quota``); admission checks each in
  the transaction that reserves the job (``gateway.node.quotas``) and refuses a job that would
  exceed one. A group's quota is one pool shared by all its members.
* ``policy_version`` is the SHA-256 over the model file, the policy file and the group
  memberships from the key registry; it is recorded with every decision.
* The engine is immutable once built and evaluates the model through an index (Casbin's
  enforcer scans every row per request); ``tests/test_policy.py`` checks that both agree.

Modules, bottom up: ``values`` (the typed value grammars), ``request`` (``RequestContext``,
the facts a constraint compares), ``constraints`` (registered constraints and obligations),
``rows`` (validated rows and the Casbin model check), ``decisions`` (``PolicyEngine`` and
``PolicyDecision``), ``ledger_inputs`` (the policy's only database reads), and for the owner's
tooling ``lint`` and ``expectations`` (``fedgate policy check|test``).
"""
