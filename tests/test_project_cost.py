"""A request's privacy projection (``gateway.node.admission.project_cost``) is a function of
its public parameters and the dataset's N̂ and δ only: computed once per distinct set of them,
and equal to the accounting's own figures."""

from __future__ import annotations

from pathlib import Path

from gateway.node.admission import NO_MODEL, JobRequest, project_cost
from gateway.node.node import Node
from ledger import accounting
from ledger.models import Dataset
from ledger.row_objects import row_object
from tests.test_gateway import JOB


def test_a_projection_is_computed_once_per_public_parameters_and_exact(node_dir: Path) -> None:
    node = Node(node_dir)
    try:
        with node.read_session() as s:
            dataset = s.get(Dataset, "demo")
        assert dataset is not None
        request = JobRequest.from_json({**JOB, "model_digest": NO_MODEL})
        first, again = project_cost(node, dataset, request), project_cost(node, dataset, request)
        assert again.cost is first.cost  # memoised, not recomputed
        expected = accounting.JobCost.for_job(
            sampling_rate=request.clients_per_round / dataset.public_users,
            noise_multiplier=request.noise_multiplier, rounds=request.rounds,
            evaluation_noise_multiplier=node.config.evaluation_noise_multiplier)
        assert first.epsilon == expected.epsilon(dataset.delta)
        assert first.cost_rdp == expected.rdp(accounting.FILTER_ORDERS)
        larger = row_object(Dataset, {**dataset.model_dump(),
                                      "public_users": dataset.public_users * 2})
        assert project_cost(node, larger, request).epsilon < first.epsilon  # N̂ is in the key
    finally:
        node.dispose()
