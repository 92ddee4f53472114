"""Fuzzes segserve's request parsing, header sniffing and decoding in-process, with hypothesis.

This is the runner (arguments, jobs, watchdog, time bound, report, crash saving); the seeds,
strategies and the seven targets (decode, header, raw, segment_request, stream_frame,
kserve_request, kserve_tensors) are in tools/fuzz_targets.py. The only exceptions allowed are
SegserveError subclasses (fuzz_targets.ALLOWED); anything else (or a broken invariant) is a bug,
counted, and its smallest input saved with --crashes. Every input is timed (the hang check): the
slowest is reported, and one over --bound-s fails the run; a watchdog ends the run if one input
takes 30 times that.

Usage: python tools/fuzz.py [--inputs N] [--seed S] [--target NAME]... [--bound-s X]
                            [--jobs J] [--crashes DIR] [--out FILE]
  --inputs N  total inputs, split evenly over the targets (default 120000).
  --jobs J    run the targets in J processes at once.
Exit status 1 if any input raised outside segserve's hierarchy or ran past the bound.
"""

from __future__ import annotations

import argparse
import faulthandler
import sys
import threading
import time
import traceback
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
from fuzz_targets import ALLOWED, LIMITS, SEEDS, TARGETS, LoadedTensorAPI, Target
from hypothesis import HealthCheck, Phase, given, seed, settings

__all__ = ["Tally", "main", "report", "run_target"]


@dataclass
class Tally:
    """What one target's run saw: inputs, outcomes by exception type, the slowest input."""

    inputs: int = 0
    wall_s: float = 0.0
    outcomes: Counter[str] = field(default_factory=Counter)
    bugs: dict[str, tuple[bytes | Any, str]] = field(default_factory=dict)  # smallest input
    slowest_s: float = 0.0
    slowest: Any = None

    @property
    def bug_count(self) -> int:
        return sum(n for kind, n in self.outcomes.items() if kind.startswith("BUG "))


def _size(case: Any) -> int:
    return len(case) if isinstance(case, bytes) else len(repr(case))


def run_target(
    target: Target,
    examples: int,
    tally: Tally,
    *,
    random_seed: int | None = 0,
    watchdog_s: float | None = None,
    slow_path: Path | None = None,
) -> Tally:
    """Runs `examples` hypothesis inputs through the target (random_seed None: derandomized),
    recording every outcome in `tally` instead of stopping at the first bug. An input still
    running after watchdog_s dumps every thread's stack and ends the process (a hang); one
    running for a tenth of that is first written to slow_path (the decoders release the GIL)."""
    running: list[Any] = [None, 0.0]  # the input being run, since when
    done = threading.Event()

    def watch() -> None:
        assert watchdog_s is not None and slow_path is not None
        while not done.wait(0.25):
            case, since = running
            if case is not None and time.monotonic() - since > watchdog_s / 10:
                slow_path.parent.mkdir(parents=True, exist_ok=True)
                slow_path.write_bytes(case if isinstance(case, bytes) else repr(case).encode())
                running[0] = None

    def one(case: Any) -> None:
        if watchdog_s is not None:
            faulthandler.dump_traceback_later(watchdog_s, exit=True)
        started = time.monotonic()
        running[:] = [case, started]
        try:
            target.run(case)
            kind = "ok"
        except ALLOWED as exc:
            kind = type(exc).__name__
        except Exception as exc:
            kind = f"BUG {type(exc).__name__}"
            known = tally.bugs.get(kind)
            if known is None or _size(case) < _size(known[0]):
                tally.bugs[kind] = (case, traceback.format_exc(limit=-6))
        took = time.monotonic() - started
        running[0] = None
        if watchdog_s is not None:
            faulthandler.cancel_dump_traceback_later()
        tally.inputs += 1
        tally.outcomes[kind] += 1
        if took > tally.slowest_s:
            tally.slowest_s, tally.slowest = took, case

    options = settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=random_seed is None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    test = given(target.strategy())(one)
    if random_seed is not None:
        test = seed(random_seed)(test)
    if watchdog_s is not None and slow_path is not None:
        threading.Thread(target=watch, daemon=True).start()
    started = time.monotonic()
    try:
        options(test)()
    finally:
        done.set()
    tally.wall_s += time.monotonic() - started
    return tally


def report(
    tallies: dict[str, Tally],
    bound_s: float,
    random_seed: int | None,
    *,
    elapsed_s: float | None = None,
    jobs: int = 1,
) -> str:
    lines = [
        f"segserve fuzz run, {time.strftime('%Y-%m-%d %H:%M:%S')}, hypothesis seed {random_seed}",
        f"python {sys.version.split()[0]}, limits {LIMITS}, per-input bound {bound_s} s",
        f"seeds: {len(SEEDS)} real images ({', '.join(SEEDS)})",
        "",
        f"{'target':<16} {'inputs':>8} {'wall s':>8} {'inputs/s':>9} {'slowest ms':>11}  outcomes",
    ]
    for name, tally in tallies.items():
        outcomes = ", ".join(f"{k} {n}" for k, n in tally.outcomes.most_common())
        rate = tally.inputs / tally.wall_s if tally.wall_s else 0.0
        lines.append(
            f"{name:<16} {tally.inputs:>8} {tally.wall_s:>8.1f} {rate:>9.0f} "
            f"{tally.slowest_s * 1e3:>11.1f}  {outcomes}"
        )
    total = sum(t.inputs for t in tallies.values())
    wall = sum(t.wall_s for t in tallies.values())
    slowest = max(tallies.items(), key=lambda item: item[1].slowest_s)
    bugs = sum(t.bug_count for t in tallies.values())
    lines += [
        "",
        f"total: {total} inputs in {wall:.1f} s of target time"
        + (f" ({elapsed_s:.1f} s wall, {jobs} jobs)" if elapsed_s is not None else "")
        + f"; slowest input {slowest[1].slowest_s * 1e3:.1f} ms"
        f" ({slowest[0]}, {_size(slowest[1].slowest)} bytes)",
        f"exceptions outside SegserveError: {bugs}",
    ]
    for name, tally in tallies.items():
        for kind, (case, trace) in tally.bugs.items():
            lines += ["", f"{name}: {kind}, smallest input {_size(case)} bytes:", trace.rstrip()]
    over = [n for n, t in tallies.items() if t.slowest_s > bound_s]
    lines.append(f"inputs over the {bound_s} s bound: {over or 'none'}")
    return "\n".join(lines)


def _run_alone(
    name: str, examples: int, random_seed: int, watchdog_s: float, crashes: Path | None
) -> Tally:
    """One target's run, in a worker process of --jobs (the KServe target loads its API);
    an input past a tenth of watchdog_s is saved as crashes/slow-<target>.bin."""
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    slow = crashes / f"slow-{name}.bin" if crashes else None
    options: dict[str, Any] = {"random_seed": random_seed, "watchdog_s": watchdog_s}
    if name != "kserve_request":
        return run_target(TARGETS[name], examples, Tally(), slow_path=slow, **options)
    with LoadedTensorAPI():
        return run_target(TARGETS[name], examples, Tally(), slow_path=slow, **options)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--inputs", type=int, default=120_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", action="append", choices=sorted(TARGETS))
    parser.add_argument("--bound-s", type=float, default=2.0)
    parser.add_argument("--crashes", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--jobs", type=int, default=1, help="targets run in parallel processes")
    args = parser.parse_args(argv)
    names = args.target or list(TARGETS)
    # OpenCV would log every corrupt image (libpng still prints its own).
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)
    per_target = -(-args.inputs // len(names))
    watchdog_s = 30 * args.bound_s
    started = time.monotonic()
    tallies: dict[str, Tally] = {}
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            futures = {
                name: pool.submit(_run_alone, name, per_target, args.seed, watchdog_s, args.crashes)
                for name in names
            }
            for name, future in futures.items():
                tallies[name] = future.result()
                print(f"{name}: {tallies[name].inputs} inputs, {tallies[name].wall_s:.1f} s")
    else:
        for name in names:
            tallies[name] = _run_alone(name, per_target, args.seed, watchdog_s, args.crashes)
            print(f"{name}: {tallies[name].inputs} inputs, {tallies[name].wall_s:.1f} s")
    elapsed_s = time.monotonic() - started
    text = report(tallies, args.bound_s, args.seed, elapsed_s=elapsed_s, jobs=args.jobs)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    if args.crashes:
        args.crashes.mkdir(parents=True, exist_ok=True)
        for name, tally in tallies.items():
            for kind, (case, _) in tally.bugs.items():
                data = case if isinstance(case, bytes) else repr(case).encode()
                (args.crashes / f"{name}-{kind.split()[-1]}.bin").write_bytes(data)
    failed = any(t.bug_count or t.slowest_s > args.bound_s for t in tallies.values())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
