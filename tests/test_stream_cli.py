"""`segserve-client stream`: its pure parts (pacing, sources, counts, summary, overlay plan)
without a server, then the command in-process against the real server on loopback.

Nothing here asserts on the wall clock: pacing is checked on the schedule, and the server cases
use `colour` (answers every frame) or `colour_batch4` (holds a lone stream's frames queued, so
that which are DROPPED and EXPIRED does not depend on timing).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import cv2
import grpc
import numpy as np
import pytest

from segserve.v1 import segserve_pb2 as pb
from segserve_client import cli
from segserve_client.cli import main as client_main
from segserve_client.masks import encode_srle
from segserve_client.play import (
    Schedule,
    StreamStats,
    Totals,
    choose_fps,
    format_summary,
    frame_count,
    load_source,
    overlay_plan,
    percentiles_ms,
    select_images,
    sequence_of,
    sequences,
    status_line,
    summarize,
    totals,
)
from segserve_client.types import stream_result
from tests.conftest import H, W, encode, quadrant_image
from tests.harness.synthetic_models import COLOUR_PALETTE

pytestmark = pytest.mark.timeout(90)


# ----------------------------------------------------------------------------------------------
# Pacing
# ----------------------------------------------------------------------------------------------


def test_schedule_is_a_fixed_rate_never_early() -> None:
    schedule = Schedule.create(fps=25.0, source_frames=4, duration_s=1.0)
    assert schedule.frames == 25 and schedule.period_s == 0.04 and schedule.length_s == 1.0
    assert [schedule.due_s(i) for i in range(3)] == [0.0, 0.04, 0.08]
    assert schedule.wait_s(2, 0.05) == pytest.approx(0.03)  # early: wait for the due time
    assert schedule.wait_s(2, 0.08) == 0.0 and schedule.wait_s(2, 0.5) == 0.0
    assert [schedule.source_index(i) for i in range(6)] == [0, 1, 2, 3, 0, 1]  # repeats
    assert schedule.capture_time_us(1_000_000, 3) == 1_120_000  # the due time, not the send


def test_late_sent_is_half_a_period_past_due() -> None:
    schedule = Schedule.create(fps=10.0, source_frames=1, duration_s=1.0)
    assert not schedule.is_late(3, 0.3)
    assert not schedule.is_late(3, 0.349)
    assert schedule.is_late(3, 0.351)
    assert not schedule.is_late(0, 0.0)


@pytest.mark.parametrize(
    ("fps", "source_frames", "duration_s", "expected"),
    [
        (30.0, 7, None, 7),  # no duration: the source once
        (30.0, 7, 1.0, 30),  # longer than the source: it repeats
        (30.0, 100, 0.1, 3),  # frames due at 0, 1/30, 2/30 (not 4 from rounding)
        (30.0, 100, 0.001, 1),
        (7.5, 2, 2.0, 15),
    ],
)
def test_frame_count(fps: float, source_frames: int, duration_s: float | None, expected: int):
    assert frame_count(fps, source_frames, duration_s) == expected


def test_frame_rate_choice_and_bad_values() -> None:
    assert choose_fps(12.5, 25.0) == 12.5
    assert choose_fps(None, 25.0) == 25.0
    assert choose_fps(None, None) == 30.0 and choose_fps(None, 0.0) == 30.0
    assert choose_fps(None, float("nan")) == 30.0
    with pytest.raises(ValueError):
        choose_fps(0.0, None)
    with pytest.raises(ValueError):
        frame_count(30.0, 0, None)
    with pytest.raises(ValueError):
        frame_count(30.0, 5, 0.0)


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------


def test_camvid_sequences() -> None:
    names = ["0001TP_006720.png", "0001TP_006690.png", "Seq05VD_f00030.png", "notes.txt", "x.PNG"]
    assert sequence_of("0001TP_006690.png") == "0001TP" and sequence_of("x.png") == ""
    assert select_images(names) == [
        "0001TP_006690.png",
        "0001TP_006720.png",
        "Seq05VD_f00030.png",
        "x.PNG",
    ]
    assert select_images(names, "0001TP") == ["0001TP_006690.png", "0001TP_006720.png"]
    assert sequences(names) == ["0001TP", "Seq05VD"]


def image_folder(root: Path) -> Path:
    folder = root / "frames"
    folder.mkdir()
    for name in ("seqA_0002.png", "seqA_0001.png", "seqB_0001.png"):
        (folder / name).write_bytes(encode(quadrant_image()))
    (folder / "README.txt").write_text("not a frame")
    return folder


def write_video(path: Path, frames: int, fps: float = 10.0) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter.fourcc(*"mp4v"), fps, (W, H))
    assert writer.isOpened()
    bgr = np.ascontiguousarray(quadrant_image()[:, :, ::-1])
    for _ in range(frames):
        writer.write(bgr)
    writer.release()
    return path


def test_load_an_image_folder(tmp_path: Path) -> None:
    folder = image_folder(tmp_path)
    everything = load_source(folder)
    assert everything.kind == "images" and everything.native_fps is None
    assert everything.names == ["seqA_0001.png", "seqA_0002.png", "seqB_0001.png"]
    assert everything.frames[0] == (folder / "seqA_0001.png").read_bytes()
    one = load_source(folder, sequence="seqB")
    assert one.names == ["seqB_0001.png"] and one.describe()["sequence"] == "seqB"
    assert load_source(folder, fps=10, duration_s=0.2).names == ["seqA_0001.png", "seqA_0002.png"]
    with pytest.raises(ValueError, match=r"sequence 'seqC'.*seqA, seqB"):
        load_source(folder, sequence="seqC")
    with pytest.raises(FileNotFoundError):
        load_source(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_source(tmp_path / "empty")


def test_load_a_video(tmp_path: Path) -> None:
    video = write_video(tmp_path / "clip.mp4", frames=5, fps=10.0)
    source = load_source(video)
    assert source.kind == "video" and len(source.frames) == 5
    assert source.native_fps == pytest.approx(10.0)
    decoded = cv2.imdecode(np.frombuffer(source.frames[0], np.uint8), cv2.IMREAD_COLOR)
    assert decoded is not None and decoded.shape == (H, W, 3)  # frames are sent as JPEG
    assert len(load_source(video, duration_s=0.3).frames) == 3  # only what the play needs
    assert len(load_source(video, fps=20.0, duration_s=0.1).frames) == 2
    with pytest.raises(ValueError, match="image folder"):
        load_source(video, sequence="seqA")
    (tmp_path / "bad.mp4").write_bytes(b"not a video")
    with pytest.raises(ValueError):
        load_source(tmp_path / "bad.mp4")


# ----------------------------------------------------------------------------------------------
# Counts and the summary
# ----------------------------------------------------------------------------------------------


def ok_answer(frame_id: int, capture_us: int, receive_us: int, answer_us: int):
    mask = pb.EncodedMask(
        encoding=pb.MASK_ENCODING_SRLE, data=encode_srle(np.zeros((2, 2), np.uint8))
    )
    return pb.SegmentStreamResponse(
        frame_id=frame_id,
        status=pb.FRAME_STATUS_OK,
        response=pb.SegmentResponse(width=2, height=2, masks=[mask]),
        capture_time_us=capture_us,
        receive_time_us=receive_us,
        answer_time_us=answer_us,
    )


def skipped_answer(frame_id: int, status: pb.FrameStatus) -> pb.SegmentStreamResponse:
    return pb.SegmentStreamResponse(
        frame_id=frame_id, status=status, capture_time_us=1, receive_time_us=2, answer_time_us=3
    )


def error_answer(frame_id: int, code: grpc.StatusCode) -> pb.SegmentStreamResponse:
    return pb.SegmentStreamResponse(
        frame_id=frame_id,
        status=pb.FRAME_STATUS_ERROR,
        error=pb.FrameError(code=code.value[0], message="no"),
    )


def played_stream() -> StreamStats:
    """Stream 0: 6 frames sent (one late), answered OK, OK, DROPPED, EXPIRED, ERROR, OK."""
    stats = StreamStats(0)
    for late in (False, False, True, False, False, False):
        stats.sent_frame(late)
    answers = [
        # capture-to-answer 10, 20 and 30 ms; server time 2, 4 and 6 ms
        (ok_answer(0, 1_000_000, 1_001_000, 1_003_000), 1_010_000),
        (ok_answer(1, 2_000_000, 2_001_000, 2_005_000), 2_020_000),
        (skipped_answer(2, pb.FRAME_STATUS_DROPPED), 2_100_000),
        (skipped_answer(3, pb.FRAME_STATUS_EXPIRED), 2_200_000),
        (error_answer(4, grpc.StatusCode.INVALID_ARGUMENT), 2_300_000),
        (ok_answer(5, 3_000_000, 3_001_000, 3_007_000), 3_030_000),
    ]
    for index, (response, arrival) in enumerate(answers):
        frame_id, result = stream_result(response, arrival_time_us=arrival)
        stats.answer(frame_id, result, at_s=0.5 * (index + 1))
    stats.ended_s = 3.0
    return stats


def test_stream_counts() -> None:
    stats = played_stream()
    assert (stats.sent, stats.late, stats.answered, stats.out_of_order) == (6, 1, 6, 0)
    assert dict(stats.answers) == {"OK": 3, "DROPPED": 1, "EXPIRED": 1, "ERROR": 1}
    assert dict(stats.errors) == {"INVALID_ARGUMENT": 1}
    assert stats.capture_to_answer_us == [10_000, 20_000, 30_000]
    assert stats.server_us == [2_000, 4_000, 6_000]
    assert totals([stats, StreamStats(1)]) == Totals(
        sent=6, late=1, ok=3, dropped=1, expired=1, errors=1
    )


def test_summary_per_stream_and_total() -> None:
    first = played_stream()
    second = StreamStats(1)
    for _ in range(3):
        second.sent_frame(False)
    _, result = stream_result(skipped_answer(0, pb.FRAME_STATUS_DROPPED))
    second.answer(0, result, at_s=1.0)
    _, result = stream_result(skipped_answer(2, pb.FRAME_STATUS_DROPPED))
    second.answer(2, result, at_s=2.0)  # frame 1's answer never came: out of order
    second.ended_s = 4.0
    second.stream_error = "UNAVAILABLE: server is draining"
    summary = summarize([first, second])
    one, two = summary["streams"]
    assert one["stream"] == 0 and one["sent"] == 6 and one["late_sent"] == 1
    assert one["answers"] == {"OK": 3, "DROPPED": 1, "EXPIRED": 1, "ERROR": 1}
    assert one["accounted"] and one["unanswered"] == 0 and one["elapsed_s"] == 3.0
    assert (one["fps_in"], one["fps_out"]) == (2.0, 1.0)
    assert one["capture_to_answer_ms"] == {"p50": 20.0, "p90": 28.0, "p99": 29.8, "max": 30.0}
    assert one["server_ms"] == {"p50": 4.0, "p99": 5.96}
    assert one["errors"] == {"INVALID_ARGUMENT": 1}
    assert not two["accounted"] and two["unanswered"] == 1 and two["out_of_order"] == 1
    assert two["capture_to_answer_ms"]["p50"] is None
    assert two["stream_errors"] == ["UNAVAILABLE: server is draining"]
    total = summary["total"]
    assert total["stream"] == "total" and total["sent"] == 9 and total["answered"] == 8
    assert total["answers"]["DROPPED"] == 3 and not total["accounted"]
    assert total["elapsed_s"] == 4.0 and total["fps_in"] == 2.25
    json.dumps(summary)  # plain JSON
    text = format_summary(summary)
    lines = text.splitlines()
    assert lines[0].split()[:7] == ["stream", "sent", "late", "OK", "DROPPED", "EXPIRED", "ERROR"]
    assert lines[1].split()[:8] == ["0", "6", "1", "3", "1", "1", "1", "yes"]
    assert "NO (1 unanswered)" in lines[2] and lines[3].split()[0] == "total"
    assert "errors: INVALID_ARGUMENT 1" in text
    assert "stream 1 ended early: UNAVAILABLE: server is draining" in text


def test_one_stream_has_no_total_row_of_its_own() -> None:
    lines = format_summary(summarize([played_stream()])).splitlines()
    assert lines[1].split()[0] == "total" and lines[2].startswith("errors:")


def test_status_line() -> None:
    before = Totals(sent=10, late=0, ok=8, dropped=1, expired=0, errors=0)
    now = Totals(sent=40, late=2, ok=35, dropped=3, expired=1, errors=1)
    line = status_line(12.0, now, before, 1.0, [10_000, 20_000, 30_000])
    assert " ".join(line.split()) == (
        "12.0 s in 30.0 fps out 27.0 fps capture-to-answer p50 20.0 p99 29.8 ms "
        "ok 35 dropped 3 expired 1 errors 1 late-sent 2"
    )
    assert "p50 - p99 - ms" in status_line(0.3, before, before, 0.25, [])


def test_percentiles() -> None:
    assert percentiles_ms([], (50,)) == {"p50": None, "max": None}
    assert percentiles_ms([1_000, 3_000], (50, 99)) == {"p50": 2.0, "p99": 2.98, "max": 3.0}


def test_overlay_plan_repeats_the_last_ok_frame() -> None:
    assert overlay_plan(7, {1, 2, 5}) == [None, 1, 2, 2, 2, 5, 5]
    assert overlay_plan(3, set()) == [None, None, None]
    assert overlay_plan(0, {0}) == []


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv",
    [
        ["stream"],
        ["stream", "clip.mp4"],
        ["stream", "clip.mp4", "-m", "m", "--policy", "newest"],
        ["stream", "clip.mp4", "-m", "m", "--streams", "0"],
        ["stream", "clip.mp4", "-m", "m", "--fps", "0"],
        ["stream", "clip.mp4", "-m", "m", "--max-age-ms", "0"],
        ["stream", "clip.mp4", "-m", "m", "--priority", "-1"],
        ["stream", "clip.mp4", "-m", "m", "--duration-s", "-1"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(argv) == 2
    assert "usage: segserve-client stream" in capsys.readouterr().err


def test_missing_source_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["stream", str(tmp_path / "none.mp4"), "-m", "m"]) == 2
    assert "no such video file or image folder" in capsys.readouterr().err


def test_defaults() -> None:
    args = cli.build_parser().parse_args(["stream", "clip.mp4", "-m", "m"])
    assert (args.fps, args.policy, args.max_age_ms, args.priority, args.streams) == (
        None,
        "queue",
        None,
        0,
        1,
    )
    assert args.duration_s is None and args.output is None and args.overlay_video is None


@pytest.fixture(scope="module")
def target(server) -> str:
    return f"127.0.0.1:{server.port}"


async def run_cli(*argv: str) -> int:
    return await asyncio.to_thread(client_main, list(argv))


async def test_video_on_two_streams_with_an_overlay_video(target, tmp_path, capsys):
    video = write_video(tmp_path / "clip.mp4", frames=6)
    report, overlay = tmp_path / "stream.json", tmp_path / "overlay.mp4"
    code = await run_cli(
        "stream",
        str(video),
        "--model",
        "colour",
        "--fps",
        "60",
        "--streams",
        "2",
        "--priority",
        "1",
        "-o",
        str(report),
        "--overlay-video",
        str(overlay),
        "--server",
        target,
        "--json",
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary == json.loads(report.read_text())
    config = summary["config"]
    assert (config["fps"], config["frames_per_stream"], config["streams"]) == (60.0, 6, 2)
    assert config["policy"] == "queue" and config["source"]["kind"] == "video"
    for row in summary["streams"]:
        assert row["sent"] == 6 and row["answers"]["OK"] == 6 and row["accounted"]
        assert row["out_of_order"] == 0 and row["capture_to_answer_ms"]["p50"] is not None
        assert row["server_ms"]["p50"] is not None
    total = summary["total"]
    assert total["sent"] == total["answered"] == 12 and total["accounted"]
    written = cv2.VideoCapture(str(overlay))
    pictures = []
    while True:
        ok, picture = written.read()
        if not ok:
            break
        pictures.append(picture[:, :, ::-1])
    written.release()
    assert len(pictures) == 6 and pictures[0].shape == (H, W, 3)
    # Top-left quadrant: red (class 1) blended half and half with class 1's colour.
    expected = 0.5 * np.array([255, 0, 0]) + 0.5 * np.array(COLOUR_PALETTE[1])
    np.testing.assert_allclose(pictures[0][H // 4, W // 4], expected, atol=24)


async def test_image_folder_sequence_repeats_for_the_duration(target, tmp_path, capsys):
    folder = image_folder(tmp_path)
    code = await run_cli(
        "stream",
        str(folder),
        "-m",
        "colour",
        "--sequence",
        "seqA",
        "--fps",
        "100",
        "--duration-s",
        "0.05",
        "--policy",
        "latest",
        "--server",
        target,
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    lines = captured.out.splitlines()
    assert lines[0].split()[:4] == ["stream", "sent", "late", "OK"]
    row = lines[1].split()
    assert row[0] == "total" and row[1] == "5"
    ok, dropped, expired, errors = (int(cell) for cell in row[3:7])
    assert ok + dropped == 5 and (expired, errors) == (0, 0)  # latest may drop frames
    assert row[7] == "yes"


async def test_latest_and_max_age_on_a_held_queue(target, tmp_path, capsys):
    """colour_batch4 holds a lone stream's frames: frames 0 and 1 are superseded by the next
    (DROPPED) and frame 2, the newest, expires (EXPIRED); all answered, so the exit is 0."""
    folder = image_folder(tmp_path)
    code = await run_cli(
        "stream",
        str(folder),
        "-m",
        "colour_batch4",
        "--fps",
        "50",
        "--policy",
        "latest",
        "--max-age-ms",
        "1000",
        "--server",
        target,
        "--json",
        "--quiet",
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert captured.err == ""  # --quiet: no status line
    total = json.loads(captured.out)["total"]
    assert total["answers"] == {"OK": 0, "DROPPED": 2, "EXPIRED": 1, "ERROR": 0}
    assert total["accounted"] and total["capture_to_answer_ms"]["p50"] is None


async def test_unknown_model_exits_1(target, tmp_path, capsys):
    code = await run_cli("stream", str(image_folder(tmp_path)), "-m", "nope", "--server", target)
    assert code == 1
    assert "NOT_FOUND" in capsys.readouterr().err


async def test_frames_that_fail_are_counted(target, tmp_path, capsys):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a_1.png").write_bytes(encode(quadrant_image()))
    (folder / "a_2.png").write_bytes(b"\x89PNG not really")
    code = await run_cli("stream", str(folder), "-m", "colour", "--fps", "100", "--server", target)
    captured = capsys.readouterr()
    assert code == 0, captured.err  # a failed frame is an answer: every frame was answered
    assert "errors: INVALID_ARGUMENT 1" in captured.out


@pytest.mark.slow
async def test_a_camvid_sequence_as_a_real_video(target, tmp_path, capsys):
    """CamVid's val frames are one drive (sequence 0016E5): 30 of them make a real 480x360 test
    video, played at 30 fps with LATEST on two streams; every frame sent is accounted for."""
    from tests.conftest import CAMVID

    frames = sorted((CAMVID / "val").glob("0016E5_*.png"))[:30]
    if len(frames) < 30:
        pytest.skip(f"CamVid val sequence 0016E5 not found under {CAMVID}")
    first = cv2.imread(str(frames[0]))
    assert first is not None
    height, width = first.shape[:2]
    video = tmp_path / "0016E5.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter.fourcc(*"mp4v"), 30.0, (width, height))
    for path in frames:
        picture = cv2.imread(str(path))
        assert picture is not None
        writer.write(picture)
    writer.release()
    overlay = tmp_path / "overlay.mp4"
    code = await run_cli(
        "stream", str(video), "--model", "colour", "--policy", "latest", "--streams", "2",
        "--overlay-video", str(overlay), "--server", target, "--json", "-q",
    )  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0, captured.err
    summary = json.loads(captured.out)
    assert summary["config"]["fps"] == 30.0 and summary["config"]["source"]["kind"] == "video"
    total = summary["total"]
    assert total["sent"] == total["answered"] == 60 and total["accounted"]
    assert total["answers"]["ERROR"] == 0
    written = cv2.VideoCapture(str(overlay))
    count = int(written.get(cv2.CAP_PROP_FRAME_COUNT))
    written.release()
    assert count == 30
