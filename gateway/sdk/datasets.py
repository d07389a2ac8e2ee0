"""The datasets a node lets a researcher see (``GET /v1/datasets``), as a list that Jupyter shows
as a table.

Everything in a listing is public by the node's construction: names and columns, N̂ (the public
user count, an owner-declared or DP-estimated figure: ``public_users_source``), the budget
(ε_total, δ), the privacy filter's usage at its best order and, once you ran a job on a
dataset, about how many more jobs like your last one it admits (public charges only).
"""

from __future__ import annotations

import html
from typing import Any

__all__ = ["Datasets"]


class Datasets(list[dict[str, Any]]):
    """The node's dataset listing: a plain ``list`` of the node's dicts (index it, iterate it,
    compare it with a list, dump it as JSON), which Jupyter renders as an HTML table."""

    def named(self, name: str) -> dict[str, Any]:
        """The dataset called ``name``; ``KeyError`` naming the visible ones if there is none."""
        for dataset in self:
            if dataset["name"] == name:
                return dataset
        raise KeyError(f"no dataset {name!r} visible to this key "
                       f"(visible: {', '.join(d['name'] for d in self) or 'none'})")

    def _repr_html_(self) -> str:
        """One row per dataset: N̂ and its source, features, classes, budget, its use and
        what remains of it in jobs like your last."""
        if not self:
            return "<p>no datasets visible to this key</p>"
        header = ("dataset", "N̂ training users", "features", "classes",
                  "examples per user and round", "ε total", "δ", "budget used", "remaining")
        rows = [(str(d["name"]), f"{d['public_users']} ({d['public_users_source']})",
                 str(d["num_features"]), str(d["num_classes"]),
                 f"≤ {d['max_examples_per_user']}", f"{d['epsilon_total']:g}",
                 f"{d['delta']:g}", f"{d['budget_used']:.1%}", _remaining(d))
                for d in self]
        head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
                       for row in rows)
        return (f"<table class=\"fedgate-datasets\"><thead><tr>{head}</tr></thead>"
                f"<tbody>{body}</tbody></table>")


def _remaining(dataset: dict[str, Any]) -> str:
    like = dataset.get("more_like_your_last_job")
    if like is None:
        return "—"
    return f"about {like['jobs_that_fit']} more jobs like your last ({like['job_id']})"
