"""Group commit: the plain rotations that arrive together share one transaction.

Under load, uvicorn hands the event loop many requests in one turn, and each
`/refresh` among them ends in the same short write: spend a token, issue its
successor, add an audit row. Committed one by one, every rotation rewrites the
same few B-tree pages (the tokens' and the audit rows' newest pages, the indexes
on times) and pays a transaction's locking; committed together, they are written
once per batch. A request joins the batch of its loop turn: the batch starts one
turn after its first request, so a lone request waits for nothing but that turn.

Inside the batch the rotations still run one after the other, each with the
statements it would run alone, so the outcome is exactly the serial one: two
requests presenting the same token in one batch see the first spend it and the
second find nothing to spend (and take the general path, which detects reuse).
Nothing of a failed batch is committed. When the database itself failed, every
request of the batch gets that error, as it would have alone; any other failure
(a constraint, say) may be one request's own, so each is then run again alone
and gets its own outcome.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

In = TypeVar("In")
Out = TypeVar("Out")

RunBatch = Callable[[Sequence[In]], Awaitable[Sequence[Out]]]


class Batcher(Generic[In, Out]):
    """Runs the items submitted in one loop turn with one call of `run` (an answer per
    item, in order); `max_size` bounds a batch, so one transaction stays short."""

    def __init__(
        self,
        run: RunBatch[In, Out],
        *,
        shared_failure: Callable[[Exception], bool],
        max_size: int = 64,
    ) -> None:
        self._run = run
        self._shared_failure = shared_failure  # true of an error every item would get alone
        self._max_size = max_size
        self._pending: list[tuple[In, asyncio.Future[Out]]] = []
        self._running: set[asyncio.Task[None]] = set()  # referenced until they finish

    async def submit(self, item: In) -> Out:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Out] = loop.create_future()
        self._pending.append((item, future))
        if len(self._pending) == 1:
            loop.call_soon(self._flush)
        elif len(self._pending) >= self._max_size:
            self._flush()
        return await future

    def _flush(self) -> None:
        batch, self._pending = self._pending, []
        if not batch:
            return
        # A task of its own, not the first request's: a request that is cancelled
        # must not strand the others of its batch.
        task = asyncio.get_running_loop().create_task(self._settle(batch))
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    async def _settle(self, batch: list[tuple[In, asyncio.Future[Out]]]) -> None:
        try:
            answers = await self._run([item for item, _ in batch])
        except asyncio.CancelledError:  # the loop is closing
            for _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            if len(batch) == 1 or self._shared_failure(exc):
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                return
            for one in batch:
                await self._settle([one])
            return
        for (_, future), answer in zip(batch, answers, strict=True):
            if not future.done():  # its request was cancelled meanwhile
                future.set_result(answer)
