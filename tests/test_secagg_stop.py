"""A coordinator stopped (SIGTERM, Ctrl-C) in the middle of SecAgg+ stops cleanly.

Found by benchmarks/load.py's soak, which ends with SIGTERM: the stages left closed
early, the protocol aborted, and the round counted as a failed attempt, so with the last
attempt the coordinator exited 1 with "round N failed 1 times" instead of stopping.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from federation_helpers import make_federation, offset_app, running_coordinator, wait_for

from confide.server.store import Store


@pytest.mark.slow
def test_a_stop_during_secure_aggregation_interrupts_the_round(tmp_path: Path) -> None:
    from confide.client import agent as agent_mod

    names = ("site-1", "site-2", "site-3")
    fed = make_federation(
        tmp_path, sites=names, rounds=3, min_sites=3, max_attempts=1, deadline=60, expected=3
    )
    fed.doc["federation"]["secure_aggregation"] = "secagg+"
    fed.doc["secagg"] = {"stage_deadline_seconds": 30}
    fed.doc["evaluation"] = {"fraction": 0.0}

    with running_coordinator(fed) as (coordinator, codes):

        class StopsTheCoordinator(agent_mod.SiteAgent):
            def _do_secagg(self, task: Any) -> None:
                if task.round == 2 and dict(task.config)["secagg.stage"].int_value == 2:
                    coordinator.stop_event.set()  # what the SIGTERM handler does
                super()._do_secagg(task)

        agents = [fed.agent(name, i, 3, app=offset_app()) for i, name in enumerate(names)]
        agents[0].__class__ = StopsTheCoordinator
        for agent in agents:
            fed.start_agent(agent)
        wait_for(lambda: codes, 120, "the coordinator to stop")
    assert codes == [0]  # stopped, not failed
    history = json.loads((tmp_path / "state" / "history.json").read_text())
    assert [r["round"] for r in history["rounds"]] == [1]
    with Store(tmp_path / "state") as store:
        rows = [(r.round, r.attempt, r.status) for r in store.rounds()]
        aborted = store.events("aborted")
    assert rows == [(1, 1, "ok"), (2, 1, "interrupted")]
    assert aborted == []
