"""The router's micro-batcher: which requests share a call, errors and callers that leave."""

from __future__ import annotations

import asyncio

import pytest

from retrieval.serving.batching import MicroBatcher


class Recorder:
    """A ``run_batch`` that records each batch and answers ``request * 10`` (or raises, or waits at a gate)."""

    def __init__(self, *, error: Exception | None = None, gate: asyncio.Event | None = None) -> None:
        self.batches: list[tuple[str, list[int]]] = []
        self.error = error
        self.gate = gate

    async def __call__(self, key: str, requests: list[int]) -> list[int]:
        self.batches.append((key, list(requests)))
        if self.gate is not None:
            await self.gate.wait()
        if self.error is not None:
            raise self.error
        return [request * 10 for request in requests]


def test_requests_arriving_together_share_one_call_up_to_the_batch_size() -> None:
    async def main() -> tuple[list[int], Recorder]:
        recorder = Recorder()
        # A wait of 0 gathers what arrives in the same event-loop turn: all 20 submit before it ends.
        batcher = MicroBatcher(run_batch=recorder, max_batch_size=8, wait_timeout_s=0.0)
        results = await asyncio.gather(*(batcher.submit("v1", number) for number in range(20)))
        return list(results), recorder

    results, recorder = asyncio.run(main())
    assert results == [number * 10 for number in range(20)]
    assert [requests for _, requests in recorder.batches] == [list(range(8)), list(range(8, 16)), list(range(16, 20))]


def test_a_full_batch_goes_out_without_waiting_for_the_timeout() -> None:
    async def main() -> Recorder:
        recorder = Recorder()
        # An hour's wait: only reaching the size can send this batch before the test ends.
        batcher = MicroBatcher(run_batch=recorder, max_batch_size=4, wait_timeout_s=3600.0)
        assert await asyncio.gather(*(batcher.submit("v1", number) for number in range(4))) == [0, 10, 20, 30]
        assert batcher.pending() == {}
        return recorder

    assert len(asyncio.run(main()).batches) == 1


def test_keys_never_share_a_batch_and_sizes_count_queries() -> None:
    async def main() -> Recorder:
        recorder = Recorder()
        batcher = MicroBatcher(run_batch=recorder, max_batch_size=5, wait_timeout_s=0.0)
        await asyncio.gather(
            batcher.submit("a", 1, size=3),
            batcher.submit("b", 2, size=1),
            batcher.submit("a", 3, size=3),  # 3 + 3 > 5: the first "a" batch goes out alone
            batcher.submit("a", 4, size=2),
            batcher.submit("a", 5, size=9),  # larger than a batch: goes out alone
        )
        return recorder

    batches = sorted(asyncio.run(main()).batches)
    assert batches == [("a", [1]), ("a", [3, 4]), ("a", [5]), ("b", [2])]


def test_an_error_of_the_batch_reaches_every_caller() -> None:
    async def main() -> list[BaseException | int]:
        batcher = MicroBatcher(
            run_batch=Recorder(error=RuntimeError("shard 1 exploded")), max_batch_size=3, wait_timeout_s=0
        )
        return list(
            await asyncio.gather(*(batcher.submit("v1", number) for number in range(3)), return_exceptions=True)
        )

    results = asyncio.run(main())
    assert [str(result) for result in results] == ["shard 1 exploded"] * 3


def test_a_caller_that_leaves_does_not_break_its_batch() -> None:
    async def main() -> tuple[list[int], Recorder]:
        gate = asyncio.Event()
        recorder = Recorder(gate=gate)
        batcher = MicroBatcher(run_batch=recorder, max_batch_size=3, wait_timeout_s=3600.0)
        # Left before its batch went out: it is dropped from the batch.
        gone_early = asyncio.ensure_future(batcher.submit("v1", 1))
        await asyncio.sleep(0)
        gone_early.cancel()
        first = [asyncio.ensure_future(batcher.submit("v1", number)) for number in (2, 3)]
        late = [asyncio.ensure_future(batcher.submit("v1", number)) for number in (4, 5, 6)]
        await asyncio.sleep(0)
        # Left while its batch runs: its result is dropped, the others get theirs.
        late[1].cancel()
        gate.set()
        results = [await task for task in (*first, late[0], late[2])]
        assert gone_early.cancelled() and late[1].cancelled()
        return results, recorder

    results, recorder = asyncio.run(main())
    assert results == [20, 30, 40, 60]
    assert [requests for _, requests in recorder.batches] == [[2, 3], [4, 5, 6]]


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="max_batch_size must be >= 1, got 0"):
        MicroBatcher(run_batch=Recorder(), max_batch_size=0, wait_timeout_s=0.0)
    with pytest.raises(ValueError, match="wait_timeout_s must be >= 0"):
        MicroBatcher(run_batch=Recorder(), max_batch_size=1, wait_timeout_s=-1.0)


def test_with_one_batch_at_a_time_the_next_batch_grows_while_one_runs() -> None:
    """While a batch runs, requests that arrive gather into one batch (up to the size), not a queue of small ones."""

    async def main() -> tuple[list[int], Recorder, dict[str, int]]:
        gate = asyncio.Event()
        recorder = Recorder(gate=gate)
        batcher = MicroBatcher(run_batch=recorder, max_batch_size=6, wait_timeout_s=0.0, max_concurrent_batches=1)
        first = asyncio.ensure_future(batcher.submit("v1", 0))
        await asyncio.sleep(0.01)  # batch [0] runs and holds the only slot
        later = []
        for number in range(1, 10):
            later.append(asyncio.ensure_future(batcher.submit("v1", number)))
            await asyncio.sleep(0.002)  # each arrives after the previous batch's wait is over
        pending = batcher.pending()
        gate.set()
        results = await asyncio.gather(first, *later)
        return list(results), recorder, pending

    results, recorder, pending = asyncio.run(main())
    assert results == [number * 10 for number in range(10)]
    assert pending == {"v1": 9}
    # [0] ran alone; the 9 that came while it ran went out as one full batch of 6 and the rest.
    assert [requests for _, requests in recorder.batches] == [[0], [1, 2, 3, 4, 5, 6], [7, 8, 9]]


def test_without_a_limit_every_due_batch_runs_at_once() -> None:
    async def main() -> Recorder:
        gate = asyncio.Event()
        recorder = Recorder(gate=gate)
        batcher = MicroBatcher(run_batch=recorder, max_batch_size=6, wait_timeout_s=0.0)
        futures = []
        for number in range(3):
            futures.append(asyncio.ensure_future(batcher.submit("v1", number)))
            await asyncio.sleep(0.002)
        gate.set()
        await asyncio.gather(*futures)
        return recorder

    assert [requests for _, requests in asyncio.run(main()).batches] == [[0], [1], [2]]
