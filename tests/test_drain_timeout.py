"""A drain whose budget runs out: segserve answers what is still running itself (UNAVAILABLE, its
own message, not gRPC's "Cancelling all calls"), `segserve serve` exits 1, and the log names only
the models that still held work.

`colour_batch4` waits 30 s for a batch of 4: a lone request sits queued far past a 1 s drain.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import time

import grpc
import pytest

from segserve.v1 import segserve_pb2 as pb
from segserve.v1 import segserve_pb2_grpc as pb_grpc
from segserve_server.cli import EXIT_DRAIN_TIMEOUT
from segserve_server.pipeline.batcher import Batcher
from segserve_server.server import Server
from tests.conftest import encode, make_settings, quadrant_image, start_cli_server
from tests.test_operations import _until_accepted

PNG = encode(quadrant_image())
DRAIN_S = 1.0
MESSAGE = "drain timeout of 1 s ran out"
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def _timeout_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "unanswered after" in line]


async def test_sigterm_drain_timeout_answers_with_segserves_message_and_exits_1(repository):
    process, port, metrics_port = await start_cli_server(repository, drain_timeout_s=DRAIN_S)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SegmentationStub(channel)
            stuck = pb.SegmentRequest(model="colour_batch4", image=pb.Image(encoded=PNG))
            unary = asyncio.ensure_future(stub.Segment(stuck))
            stream = stub.SegmentStream()
            await stream.write(pb.SegmentStreamRequest(frame_id=7, request=stuck))
            await _until_accepted(metrics_port, "colour_batch4", 2)
            # An idle model answers before the drain: it has nothing left when the budget ends.
            idle = pb.SegmentRequest(model="colour", image=pb.Image(encoded=PNG))
            await stub.Segment(idle)

            signalled_s = time.monotonic()
            process.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await unary
            waited_s = time.monotonic() - signalled_s
            assert failed.value.code() == UNAVAILABLE
            assert MESSAGE in failed.value.details(), failed.value.details()
            assert "Cancelling all calls" not in failed.value.details()
            assert DRAIN_S * 0.9 <= waited_s < DRAIN_S + 5

            frames = []
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                while (answer := await stream.read()) != grpc.aio.EOF:
                    frames.append(answer)
            # The frame read before the drain is answered (an error: the drain timed out), then
            # the stream ends UNAVAILABLE with segserve's message.
            assert [f.frame_id for f in frames] == [7]
            assert frames[0].status == pb.FRAME_STATUS_ERROR
            assert frames[0].error.code == UNAVAILABLE.value[0]
            assert MESSAGE in frames[0].error.message
            assert ended.value.code() == UNAVAILABLE
            assert "Cancelling all calls" not in ended.value.details()
            assert "draining" in ended.value.details()

        assert await asyncio.to_thread(process.wait, 30) == EXIT_DRAIN_TIMEOUT == 1
        assert process.stderr is not None
        log = await asyncio.to_thread(process.stderr.read)
    finally:
        if process.poll() is None:
            process.kill()
    lines = _timeout_lines(log)
    assert len(lines) == 1 and "model colour_batch4:1:" in lines[0], log
    waited = re.search(r"unanswered after (\d+\.\d)s", lines[0])
    assert waited is not None and float(waited.group(1)) >= DRAIN_S * 0.9, lines[0]
    assert "batches still running after 0.0s" not in log
    assert "drain timeout: calls still running after" in log


async def test_sigterm_drain_with_nothing_running_exits_0_and_logs_no_timeout(repository):
    process, port, _ = await start_cli_server(repository, drain_timeout_s=DRAIN_S)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = pb_grpc.SegmentationStub(channel)
            await stub.Segment(pb.SegmentRequest(model="colour", image=pb.Image(encoded=PNG)))
        process.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(process.wait, 30) == 0
        assert process.stderr is not None
        log = await asyncio.to_thread(process.stderr.read)
    finally:
        if process.poll() is None:
            process.kill()
    assert not _timeout_lines(log), log
    assert "drain timeout" not in log, log


async def test_in_process_drain_timeout(repository, caplog):
    """Server.stop: the queued request fails UNAVAILABLE with segserve's message at the
    budget's end, drain_timed_out says so, and only colour_batch4 is logged, with the time
    the drain really waited."""
    server = Server(make_settings(repository, metrics_port=None, kserve_port=None))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.SegmentationStub(channel)
            stuck = pb.SegmentRequest(model="colour_batch4", image=pb.Image(encoded=PNG))
            unary = asyncio.ensure_future(stub.Segment(stuck))
            batcher = server.core.models.get("colour_batch4").batcher
            limit = time.monotonic() + 30
            while batcher.queue_depth < 1:
                assert time.monotonic() < limit, "the request never reached the queue"
                await asyncio.sleep(0.01)
            caplog.set_level(logging.WARNING)
            caplog.clear()
            started_s = time.monotonic()
            stopping = asyncio.ensure_future(server.stop(timeout_s=DRAIN_S))
            with pytest.raises(grpc.aio.AioRpcError) as failed:
                await unary
            assert failed.value.code() == UNAVAILABLE
            assert MESSAGE in failed.value.details()
            await stopping
            assert time.monotonic() - started_s < DRAIN_S + 3
    finally:
        await server.stop(timeout_s=5)
    assert server.drain_timed_out
    batchers = [r for r in caplog.records if r.name == "segserve_server.pipeline.batcher"]
    assert [r.args[0] for r in batchers if isinstance(r.args, tuple)] == ["colour_batch4:1"]
    assert isinstance(batchers[0].args, tuple)
    assert batchers[0].args[-1] >= DRAIN_S * 0.9


async def test_in_process_drain_within_budget_is_not_a_timeout(repository, caplog):
    server = Server(make_settings(repository, metrics_port=None, kserve_port=None))
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = pb_grpc.SegmentationStub(channel)
            await stub.Segment(pb.SegmentRequest(model="colour", image=pb.Image(encoded=PNG)))
        caplog.set_level(logging.WARNING)
        caplog.clear()
        await server.stop(timeout_s=DRAIN_S)
    finally:
        await server.stop(timeout_s=5)
    assert not server.drain_timed_out
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_idle_batcher_stop_with_no_budget_left_logs_nothing(caplog):
    """The models get what the RPCs left of the budget, maybe 0 s: a batcher with nothing
    running or queued then stops without a "still running" warning."""
    from tests.test_batcher import GatedBackend, dynamic

    batcher = Batcher(GatedBackend(), dynamic(8), name="idle:1")
    await batcher.start()
    caplog.set_level(logging.WARNING)
    assert await batcher.stop(timeout_s=0.0) == 0
    assert not caplog.records
