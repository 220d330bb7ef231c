"""Rebalancing over HTTP: the plan, a round carried out, the decisions made. The decisions are
:mod:`controller.services.rebalance`'s (and the policy :mod:`controller.rebalancer`'s)."""

from __future__ import annotations

from aiohttp import web

from controller.api import (
    ApiError,
    Route,
    json_body,
    page_query,
    paged,
    reject_unknown,
    reply,
    state,
)
from controller.services import rebalance


async def show_plan(request: web.Request) -> web.Response:
    return reply(await rebalance.plan(state(request)))


async def apply(request: web.Request) -> web.Response:
    ctl = state(request)
    reject_unknown(await json_body(request), set())
    return reply(await rebalance.apply(ctl, "apply"), 202)


async def show_history(request: web.Request) -> web.Response:
    limit, after = page_query(request)
    if after is not None and not (after.isdigit() and len(after) <= 18):  # an id: within a 64-bit integer
        raise ApiError(400, "after must be the next cursor of the previous page")
    entries, following = paged(await rebalance.history(state(request), limit + 1, int(after) if after else None),
                               limit, lambda entry: str(entry["id"]))
    return reply({"entries": entries, "next": following})


ROUTES = [
    Route("GET", "/v1/rebalance/plan", show_plan, "admin",
          "The migrations a rebalancing round would make now and why: each node's measured load, the moves "
          "(wave 1 starts now, later waves once it ends) and what stays on a busy node with the reason."),
    Route("POST", "/v1/rebalance/apply", apply, "admin",
          "Run one rebalancing round: plan, then start the first wave's migrations; every decision is recorded "
          "(409 while another round runs).", {}),
    Route("GET", "/v1/rebalance/history", show_history, "admin",
          "Rebalancing decisions, newest first, with how each migration went, a page at a time (?limit=&after=NEXT)."),
]
