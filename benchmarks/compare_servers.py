"""The contenders (b) segserve, (c) a real Triton and (d) the naive server, each its own process.

`start_segserve`, `start_triton` and `start_naive` launch one server on a free loopback port and
wait for its ready line; each returns a `ServerProcess` (address, protocol and model name for the
load generator, its log, notes for the report), and `servers_running` starts the wanted ones and
stops them all on the way out, recording any that failed to start. The Triton side is the
tritonserver binary bundled with nvidia-pytriton, run from a venv of its own
(`find_triton_python`) with benchmarks/triton/model.py as its Python model.
Used by benchmarks/compare.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from segserve_server.model_repository import ModelConfig

ROOT = Path(__file__).resolve().parent.parent
TRITON_VENVS = (ROOT / ".venv-triton",)
TRITON_MODULES = ("pytriton", "onnxruntime", "numpy", "cv2", "simplejpeg")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class ServerProcess:
    name: str
    process: subprocess.Popen[bytes]
    address: str
    protocol: str
    model: str
    log: Path
    notes: dict[str, Any] = field(default_factory=dict)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _spawn(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def _wait_for_line(
    process: subprocess.Popen[bytes], log: Path, pattern: str, timeout_s: float
) -> re.Match[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if match := re.search(pattern, log.read_text(errors="replace")):
            return match
        if process.poll() is not None:
            break
        time.sleep(0.2)
    process.kill()
    text = log.read_text(errors="replace")
    errors = [line for line in text.splitlines() if line.startswith("E") or "rror" in line]
    raise RuntimeError(
        f"server did not start (see {log}): " + "; ".join(errors[-5:] or [text[-500:]])
    )


def start_segserve(repository: Path, model: str, work: Path) -> ServerProcess:
    log = work / "segserve.log"
    # Free ports only: benchmarks run several servers side by side.
    env = {**os.environ, "SEGSERVE_KSERVE_PORT": "0", "SEGSERVE_HTTP_PORT": "0"}
    cmd = [
        sys.executable,
        "-m",
        "segserve_server.cli",
        "serve",
        "--model-repository",
        str(repository),
    ]
    cmd += ["--host", "127.0.0.1", "--port", "0", "--metrics-port", "0", "--log-level", "INFO"]
    process = _spawn(cmd, log, env)
    match = _wait_for_line(process, log, r"listening on 127\.0\.0\.1:(\d+)", 120)
    return ServerProcess("segserve", process, f"127.0.0.1:{match.group(1)}", "segserve", model, log)


def start_naive(model_dir: Path, work: Path) -> ServerProcess:
    log = work / "naive.log"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks" / "naive_server.py"),
        "--model-dir",
        str(model_dir),
    ]
    process = _spawn(cmd, log)
    match = _wait_for_line(process, log, r"listening on 127\.0\.0\.1:(\d+)", 120)
    return ServerProcess(
        "naive", process, f"127.0.0.1:{match.group(1)}", "segserve", model_dir.name, log
    )


TRITON_CONFIG = """name: "{name}"
backend: "python"
max_batch_size: {max_batch}
input [ {{ name: "image" data_type: TYPE_STRING dims: [ 1 ] }} ]
output [
  {{ name: "mask" data_type: TYPE_STRING dims: [ 1 ] }},
  {{ name: "timings_us" data_type: TYPE_INT64 dims: [ 6 ] }}
]
dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}
instance_group [ {{ kind: KIND_CPU count: {instances} }} ]
parameters {{ key: "repo_root" value: {{ string_value: "{root}" }} }}
parameters {{ key: "segserve_model_dir" value: {{ string_value: "{model_dir}" }} }}
parameters {{ key: "ort_threads" value: {{ string_value: "{ort_threads}" }} }}
"""

_TRITON_PATHS = """import json, pathlib, sys, sysconfig, pytriton
root = pathlib.Path(pytriton.__file__).parent
print(json.dumps({"server": str(root / "tritonserver"), "libs": str(root.parent / "nvidia_pytriton.libs"),
    "libdir": sysconfig.get_config_var("LIBDIR"), "bin": str(pathlib.Path(sys.executable).parent),
    "python": f"{sys.version_info[0]}.{sys.version_info[1]}", "version": __import__("importlib.metadata").metadata.version("nvidia-pytriton")}))
"""


def start_triton(
    triton_python: Path, model_dir: Path, config: ModelConfig, work: Path, instances: int
) -> ServerProcess:
    """The tritonserver binary of nvidia-pytriton, launched directly (see triton-on-cpu notes)."""
    paths = json.loads(subprocess.check_output([str(triton_python), "-c", _TRITON_PATHS]))
    name = f"{config.name}_triton"
    repo = work / "triton_repository"
    (repo / name / "1").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "benchmarks" / "triton" / "model.py", repo / name / "1" / "model.py")
    (repo / name / "config.pbtxt").write_text(
        TRITON_CONFIG.format(
            name=name,
            max_batch=max(1, config.batching.max_batch_size),
            delay_us=config.batching.max_queue_delay_us,
            instances=instances,
            root=ROOT,
            model_dir=model_dir.resolve(),
            ort_threads=0 if instances == 1 else max(1, len(os.sched_getaffinity(0)) // instances),
        )
    )
    server = Path(paths["server"])
    backends = work / "triton_backends"
    if not backends.exists():
        shutil.copytree(server / "backends", backends)
        stub = server / "python_backend_stubs" / paths["python"] / "triton_python_backend_stub"
        shutil.copy(stub, backends / "python" / "triton_python_backend_stub")
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = ":".join(
        p for p in (paths["libdir"], paths["libs"], env.get("LD_LIBRARY_PATH", "")) if p
    )
    env["PATH"] = f"{paths['bin']}:{env['PATH']}"
    port = free_port()
    cmd = [str(server / "bin" / "tritonserver"), "--model-repository", str(repo)]
    cmd += ["--backend-directory", str(backends), "--grpc-address", "127.0.0.1"]
    cmd += ["--grpc-port", str(port), "--allow-http", "false", "--allow-metrics", "false"]
    cmd += ["--log-verbose", "0", "--exit-timeout-secs", "10"]
    cmd += ["--backend-config", "python,stub-timeout-seconds=120"]
    log = work / "triton.log"
    process = _spawn(cmd, log, env)
    _wait_for_line(process, log, r"Started GRPCInferenceService", 180)
    notes = {"nvidia-pytriton": paths["version"], "instances": instances}
    return ServerProcess("triton", process, f"127.0.0.1:{port}", "triton", name, log, notes)


def find_triton_python(given: Path | None) -> tuple[Path | None, str]:
    """The first Triton venv whose python imports what benchmarks/triton/model.py needs, or
    None and why not."""
    candidates = [given] if given else [venv / "bin" / "python" for venv in TRITON_VENVS]
    check = (
        f"import importlib.util as u; print([m for m in {TRITON_MODULES!r} if not u.find_spec(m)])"
    )
    reasons = []
    for python in candidates:
        if python is None or not python.exists():
            continue
        found = subprocess.run([str(python), "-c", check], capture_output=True, text=True)
        if found.returncode == 0 and found.stdout.strip() == "[]":
            return python, ""
        reasons.append(
            f"{python.parent.parent} lacks {found.stdout.strip() or found.stderr.strip()[-200:]} "
            "(pip install opencv-python-headless simplejpeg there)"
        )
    tried = ", ".join(str(c.parent.parent) for c in candidates if c is not None)
    return None, "; ".join(reasons) or f"no Triton venv ({tried}); see --triton-python"


@contextlib.contextmanager
def servers_running(
    starters: dict[str, Callable[[], ServerProcess]], skipped: dict[str, str]
) -> Iterator[dict[str, ServerProcess]]:
    running: dict[str, ServerProcess] = {}
    try:
        for name, start in starters.items():
            try:
                running[name] = start()
            except Exception as exc:
                skipped[name] = f"failed to start: {exc}"
                print(f"{name}: {skipped[name]}", file=sys.stderr)
        yield running
    finally:
        for server in running.values():
            server.stop()
