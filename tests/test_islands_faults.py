"""A worker killed inside one island: that island re-forms and rejoins, the other never stops.

Island b's rank 1 is SIGKILLed in the backward of step 5 (the middle of outer round 3) and
restarted. b's survivor loses its peer, both rejoin in a new generation of site b, learn from
the coordinator that round 2 is the last decided, and join round 3 without inner steps: they
receive the global copy and momentum from a over gRPC and train rounds 4 on. Island a keeps
its generation throughout; at round 3 it waits for b's arrival (or the quorum timeout). The
coordinator's decided rounds say who was present; the single-process reference replays them.
"""

from __future__ import annotations

import pytest
from harness.fault_worker import FAULT_WORKER
from islands_run import run_islands
from test_islands import BASE, SITES, check_against_reference


@pytest.mark.timeout(300)
def test_killed_worker_in_one_island_rejoins_and_the_other_never_stops(tmp_path):
    args = [*BASE, "--steps", "8", "--outer-every", "2", "--quorum-timeout", "40",
            "--timeout", "20"]
    fault = {"ZEROP2P_FAULT": "backward:5:1", "ZEROP2P_FAULT_MARK": str(tmp_path / "fault")}
    run = run_islands(tmp_path / "out", sites={s: 2 for s in SITES}, args=args, max_restarts=1,
                      site_env={"b": fault}, site_entry={"b": FAULT_WORKER}, timeout=240)
    assert (tmp_path / "fault.0").exists(), "the fault never fired"
    quorums = run.quorums()
    print("rounds:", quorums)
    assert len(quorums) == 4
    assert all(("a", False) in q for q in quorums), "island a missed a round"
    assert ("b", False) not in quorums[2], "b cannot have contributed to the round it lost"
    assert quorums[3] == [("a", False), ("b", False)], "b should be back by the last round"
    generations = {(i["site"], i["generation"]) for r in run.rounds for i in r["islands"]}
    assert len({g for s, g in generations if s == "a"}) == 1, "island a re-formed"
    assert len({g for s, g in generations if s == "b"}) == 2, "island b did not re-form once"
    for name in ("a0", "a1"):
        assert "lost a peer" not in run.output(name), f"{name} stopped stepping"
    assert sorted(run.losses("a")) == list(range(8)), "island a skipped steps"
    rounds = run.result("a")["island"]["rounds"]
    print("island a's wait per round (s):", [round(r["seconds"], 2) for r in rounds])
    diff = check_against_reference(run, args, quorums=quorums)
    print(f"after the fault: max weight diff vs the replayed reference {diff:.2e}")
