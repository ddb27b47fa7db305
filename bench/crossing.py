"""The cost of a session across broker nodes, beside the same session on one node.

Theory of operation
===================
Two ``relay serve`` nodes share one PostgreSQL and one Redis (servers started
for the run on free ports, as the tests start them) and the device CA and TOTP
sealing key, as an operator's nodes do. The engineer always uses node A.
The same one device (a real agent of :mod:`bench.fleet`, granting at once)
runs sessions one after another, first with its control channel on node A
(the baseline: one node, with the shared store and Redis in the loop), then
on node B, so that every session crosses nodes: the claim, the offer and the
grant go over the node bus and the device opens its tunnel at A's advertised
address. The steps are timed as in the set-up scenario
(:func:`bench.sessions.one_session`): request → offer on the device, grant →
first byte at the engineer, on-site End → engineer socket closed. The
difference is the cost of crossing; no tunnel byte crosses nodes by design,
so there is no throughput figure to take here.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Final

import trio

from bench.results import Goal, Mode, ScenarioResult, Table, fmt_ms, ratio
from bench.sessions import SETUP_GOAL, SetupTimings, one_session, run_fleet
from bench.world import (
    free_port,
    percentiles,
    world,
)

HEARTBEAT_S: Final = 0.5
CROSSING_GOAL = (
    "session set-up across broker nodes (engineer on A, device on B)",
    "request -> offer p99 < 50 ms; grant -> first byte p99 < 100 ms (as on one node)",
)


def run_crossing(mode: Mode, *, sessions: int | None = None) -> ScenarioResult:
    """Set-up steps on one node and across two, the same device and engineer."""
    # Imported here: the servers' helpers live with the tests that made them.
    from tests.pg_cluster import postgres_cluster
    from tests.redis_server import redis_server

    count = sessions or (200 if mode == "full" else 10)
    one_node, across = SetupTimings(), SetupTimings()
    # Its own directory: the server's account must enter it (postgres_cluster
    # hands it over), which a 0700 parent would forbid.
    base = Path(tempfile.mkdtemp(prefix="relay-bench-pg-"))
    try:
        with (
            postgres_cluster(base) as pg,
            world() as w,
            redis_server(w.root / "redis") as redis,
        ):
            node_a = w.broker
            node_b = w.add_node("node-b")
            database_url = pg.new_database()
            banner = free_port()
            for node, node_id in ((node_a, "node-a"), (node_b, "node-b")):
                node.write_node_config(
                    node_id,
                    database_url=database_url,
                    redis_url=redis.url,
                    cluster={"heartbeat_s": HEARTBEAT_S},
                    sessions={"allowed_channels": [f"tcp:{banner}"]},
                )
            agent_dirs = [d.root for d in w.enroll_devices("bench-dev", 1)]
            engineer = w.add_engineer()
            node_a.start()
            node_b.start()
            try:
                credentials = w.login(engineer)

                async def main() -> None:
                    for node, timings in ((node_a, one_node), (node_b, across)):
                        async with run_fleet(
                            w, agent_dirs, banner, node.device_url
                        ) as fleet:
                            # The device's presence on its node reaches Redis
                            # within a heartbeat.
                            await trio.sleep(HEARTBEAT_S * 3)
                            for _ in range(count):
                                await one_session(
                                    credentials, fleet, agent_dirs[0].name, timings
                                )

                trio.run(main)
            finally:
                node_b.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)
    return _result(count, one_node, across)


def _result(count: int, one_node: SetupTimings, across: SetupTimings) -> ScenarioResult:
    steps = (
        ("request → offer on the device", "request_to_offer"),
        ("grant → first byte at the engineer", "grant_to_first_byte"),
        ("on-site End → engineer socket closed", "kill_to_closed"),
    )
    columns = ("step", "where", "n", "p50", "p90", "p99", "max")
    rows: list[tuple[str, ...]] = []
    p99: dict[tuple[str, str], float] = {}
    for title, name in steps:
        for where, timings in (("one node", one_node), ("across nodes", across)):
            p = percentiles(getattr(timings, name))
            p99[(name, where)] = p["p99"]
            rows.append(
                (
                    title,
                    where,
                    str(count),
                    *(fmt_ms(p[k]) for k in ("p50", "p90", "p99", "max")),
                )
            )
    offer, first = (
        p99[("request_to_offer", "across nodes")],
        p99[("grant_to_first_byte", "across nodes")],
    )
    raw: dict[str, Any] = {
        where: {
            "request_to_offer_s": t.request_to_offer,
            "grant_to_first_byte_s": t.grant_to_first_byte,
            "kill_to_closed_s": t.kill_to_closed,
        }
        for where, t in (("one_node", one_node), ("across_nodes", across))
    }
    return ScenarioResult(
        name="crossing",
        title="Sessions across broker nodes",
        tables=[
            Table(
                f"{count} sessions one after another on one device; two nodes on "
                "one PostgreSQL and one Redis; the engineer on node A, the device "
                "on A (one node), then on B (across nodes)",
                columns,
                tuple(rows),
            )
        ],
        goals=[
            Goal(
                figure=CROSSING_GOAL[0],
                goal=CROSSING_GOAL[1],
                measured=f"p99 {fmt_ms(offer)}; p99 {fmt_ms(first)}",
                baseline=(
                    "one node: p99 "
                    f"{fmt_ms(p99[('request_to_offer', 'one node')])}; p99 "
                    f"{fmt_ms(p99[('grant_to_first_byte', 'one node')])}"
                ),
                ratio=ratio(offer, p99[("request_to_offer", "one node")]),
                met=count >= 100 and offer < 0.050 and first < 0.100,
            )
        ],
        notes=[
            "The ratio is request → offer across nodes over the same on one node; "
            f"the single-node goal ({SETUP_GOAL[1]}) applies to both.",
        ],
        raw=raw,
    )
