"""server.finish_tasks: background tasks end with the worker, even ones that swallow a cancellation."""

from __future__ import annotations

import asyncio
import logging

import pytest

from egress_router.proxy.server import finish_tasks


def test_tasks_that_swallow_cancellations_are_cancelled_again_until_they_end() -> None:
    loop = asyncio.new_event_loop()
    swallowed: list[int] = []

    async def stubborn(times: int) -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                if len(swallowed) >= times:
                    raise
                swallowed.append(1)  # as wait_for may do when cancellation and completion coincide

    async def failing() -> None:
        raise RuntimeError("background failure")

    try:
        tasks = [loop.create_task(stubborn(3)), loop.create_task(failing())]
        loop.run_until_complete(asyncio.sleep(0))
        finish_tasks(loop)
        assert all(task.done() for task in tasks)
        assert len(swallowed) == 3
        assert tasks[0].cancelled() and isinstance(tasks[1].exception(), RuntimeError)
    finally:
        loop.close()


def test_a_task_that_never_ends_is_reported_not_waited_for(caplog: pytest.LogCaptureFixture) -> None:
    loop = asyncio.new_event_loop()

    async def immortal() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                continue

    task = loop.create_task(immortal())
    loop.run_until_complete(asyncio.sleep(0))
    with caplog.at_level(logging.WARNING):
        finish_tasks(loop, attempts=3, wait=0.01)
    assert not task.done()
    assert "1 background task(s) did not end when cancelled: test_a_task_that_never_ends_is_reported_not_waited" \
           "_for.<locals>.immortal" in caplog.text
    # let the test end cleanly: break the loop by closing the coroutine
    task.get_coro().close()  # type: ignore[union-attr]
    loop.close()
