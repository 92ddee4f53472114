"""The load: one closed-loop point against a running server, and what it cost in CPU.

`bench_point` runs `segserve-client bench` in a process of its own against a `ServerProcess`
(after its own warm-up) and adds to its point the server's CPU per answered image (its whole
process tree, from /proc), the load generator's, and how busy the machine was with anything else
meanwhile. Used by benchmarks/compare.py for every server, concurrency and round.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from compare_servers import ROOT, ServerProcess


def process_tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process and all its descendants (from /proc)."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            parents[int(entry.name)] = int(fields[1])
            times[int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = {pid}, [pid]
    while frontier:
        parent = frontier.pop()
        children = [p for p, pp in parents.items() if pp == parent and p not in tree]
        tree.update(children)
        frontier.extend(children)
    return sum(times.get(p, 0.0) for p in tree)


def _busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (all processes, /proc/stat)."""
    fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(f) for f in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def bench_point(
    server: ServerProcess,
    frames: Path,
    concurrency: int,
    duration_s: float,
    warmup_s: float,
    work: Path,
) -> dict[str, Any]:
    """One closed-loop point from a `segserve-client bench` process, after its own warm-up.

    Adds the server's CPU per answered image (its whole process tree), the load generator's, and
    `other_cores`: how busy the machine was with anything else meanwhile (0 on a quiet machine).
    """

    def run(seconds: float, output: Path) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "segserve_client.cli", "bench", "--server", server.address]
        cmd += ["--protocol", server.protocol, "--model", server.model, "--images", str(frames)]
        cmd += ["--size", "original", "--concurrency", str(concurrency), "--timeout", "60"]
        cmd += ["--duration-s", str(seconds), "--warmup-s", "0", "--output", str(output), "--json"]
        client_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        server_before, busy_before = process_tree_cpu_s(server.process.pid), _busy_cpu_s()
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, cwd=ROOT, timeout=seconds + 300)
        elapsed = time.perf_counter() - started
        server_s = process_tree_cpu_s(server.process.pid) - server_before
        busy_s = _busy_cpu_s() - busy_before
        client_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        client_s = (client_after.ru_utime + client_after.ru_stime) - (
            client_before.ru_utime + client_before.ru_stime
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"bench against {server.name} failed: {done.stderr.decode()[-2000:]}"
            )
        point: dict[str, Any] = json.loads(output.read_text())["points"][0]
        ok = max(1, point["ok"])
        point["server_cpu_ms_per_image"] = round(server_s / ok * 1e3, 2)
        point["client_cpu_ms_per_image"] = round(client_s / ok * 1e3, 2)
        point["other_cores"] = round(max(0.0, busy_s - server_s - client_s) / elapsed, 2)
        return point

    if warmup_s > 0:
        run(warmup_s, work / "warmup.json")
    return run(duration_s, work / f"{server.name}_c{concurrency}.json")
