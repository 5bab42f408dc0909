"""Small asyncio helpers shared by the workers."""

from __future__ import annotations

import asyncio
import logging

log = logging.getLogger("headwise")


async def quiet(aw) -> None:
    """Await `aw`, logging (not raising) its failure: for best-effort clean-up calls."""
    try:
        await aw
    except Exception as e:  # noqa: BLE001 - best effort by definition (TTLs and lapses clean up)
        log.debug("best-effort call failed: %s", e)


async def settle(aw, timeout_s: float) -> None:
    """Run `aw` to its end even while the caller is being cancelled (shielded), for at most timeout_s."""
    task = asyncio.ensure_future(quiet(aw))
    try:
        await asyncio.wait_for(asyncio.shield(task), timeout_s)
    except (TimeoutError, asyncio.CancelledError):  # the caller's own exception goes on; the task finishes alone
        pass
