"""A real tritonserver on this machine: the binary that nvidia-pytriton bundles (Triton 2.51,
Python backend only, runs without a GPU), serving a segserve repository's ONNX models through
`python_backend/model.py`. For development and for the tests; production runs NVIDIA's
tritonserver image, whose onnxruntime backend loads the repository as it is.

The Triton side needs numpy < 2, so it lives in a venv of its own (`make triton-env`, or
tools/triton/setup_env.sh). Running it by hand:

    python -m tests.harness.triton_local --repository model_repository --grpc-port 8001

What makes the bundled binary work here (each seen to fail otherwise): the backend directory
assembled from the wheel (`backends/python` plus the Python stub of the venv's Python version),
LD_LIBRARY_PATH with the interpreter's LIBDIR (the stub links libpython3.X.so) and the wheel's
`nvidia_pytriton.libs`, and the venv's bin first on PATH (the stub finds its packages by it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

ONNX_PLATFORMS = ("onnxruntime_onnx", "onnxruntime")
MODEL_PY = Path(__file__).resolve().parent / "python_backend" / "model.py"
DEFAULT_VENV = Path(".venv-triton")


class TritonUnavailable(Exception):
    """No usable tritonserver: the message says what is missing and how to get it."""


@dataclass(frozen=True)
class TritonInstall:
    """The tritonserver of a venv with nvidia-pytriton installed, ready to launch."""

    venv: Path
    binary: Path
    backend_dir: Path
    library_path: tuple[Path, ...]

    @classmethod
    def find(cls, venv: Path) -> TritonInstall:
        """Checks the venv and assembles its backend directory (once); raises TritonUnavailable."""
        venv = venv.resolve()
        python = venv / "bin" / "python"
        if not python.is_file():
            raise TritonUnavailable(
                f"no Triton venv at {venv}: run `make triton-env` (tools/triton/setup_env.sh)"
            )
        probe = subprocess.run(
            [
                str(python),
                "-c",
                "import sys, sysconfig, pytriton, os; print(sysconfig.get_config_var('LIBDIR')); "
                "print(f'{sys.version_info[0]}.{sys.version_info[1]}'); "
                "print(os.path.dirname(pytriton.__file__))",
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        if probe.returncode != 0:
            raise TritonUnavailable(
                f"the Triton venv {venv} cannot import pytriton: {probe.stderr.strip()[-500:]}"
            )
        libdir, version, package = probe.stdout.split()
        server = Path(package) / "tritonserver"
        binary = server / "bin" / "tritonserver"
        stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
        for path in (binary, stub, server / "backends" / "python" / "libtriton_python.so"):
            if not path.is_file():
                raise TritonUnavailable(f"nvidia-pytriton in {venv} lacks {path}")
        backend_dir = venv / "segserve-triton-backends"
        python_backend = backend_dir / "python"
        if not (python_backend / "triton_python_backend_stub").is_file():
            python_backend.mkdir(parents=True, exist_ok=True)
            for item in (server / "backends" / "python").iterdir():
                if item.is_file():
                    shutil.copy2(item, python_backend / item.name)
            shutil.copy2(stub, python_backend / stub.name)
        libs = Path(package).parent / "nvidia_pytriton.libs"
        return cls(venv, binary, backend_dir, (Path(libdir), libs))

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        paths = [str(p) for p in self.library_path]
        if env.get("LD_LIBRARY_PATH"):
            paths.append(env["LD_LIBRARY_PATH"])
        env["LD_LIBRARY_PATH"] = ":".join(paths)
        env["PATH"] = f"{self.venv / 'bin'}:{env.get('PATH', '')}"
        for name in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):
            env.pop(name, None)
        return env


def python_backend_config(text: str, name: str) -> mc.ModelConfig:
    """An ONNX model's config.pbtxt turned into the same model on the Python backend."""
    config = mc.ModelConfig()
    text_format.Parse(text, config)
    config.name = config.name or name
    if config.platform in ONNX_PLATFORMS or config.backend == "onnxruntime":
        config.platform = ""
        config.backend = "python"
        if config.default_model_filename:
            filename = config.default_model_filename
            config.parameters["segserve.onnx_filename"].string_value = filename
            config.default_model_filename = ""
        config.ClearField("optimization")  # GPU accelerators: not for the Python backend
        for group in config.instance_group:
            group.kind = mc.ModelInstanceGroup.KIND_CPU
            group.ClearField("gpus")
    return config


def write_python_backend_repository(
    source: Path, dest: Path, models: Sequence[str] | None = None
) -> list[str]:
    """Copies the models of repository `source` to `dest`, ONNX ones wrapped for the Python
    backend (model.py beside each model.onnx); returns the model names written."""
    written = []
    for model_dir in sorted(p for p in source.iterdir() if (p / "config.pbtxt").is_file()):
        if models is not None and model_dir.name not in models:
            continue
        target = dest / model_dir.name
        shutil.copytree(model_dir, target, dirs_exist_ok=True)
        config = python_backend_config((model_dir / "config.pbtxt").read_text(), model_dir.name)
        (target / "config.pbtxt").write_text(text_format.MessageToString(config))
        if config.backend == "python":
            for version_dir in target.iterdir():
                if version_dir.is_dir() and version_dir.name.isdigit():
                    shutil.copy2(MODEL_PY, version_dir / "model.py")
        written.append(model_dir.name)
    return written


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class TritonProcess:
    """One tritonserver process (gRPC only, on 127.0.0.1's `grpc_port`); start, kill, restart.

    It runs in a process group of its own, so that kill() also ends the Python stubs.
    """

    def __init__(
        self,
        install: TritonInstall,
        repository: Path,
        *,
        grpc_port: int | None = None,
        log_path: Path | None = None,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.install = install
        self.repository = repository
        self.grpc_port = grpc_port or free_port()
        self.log_path = log_path or Path(tempfile.mkdtemp(prefix="triton-log-")) / "triton.log"
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at_s = 0.0

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def command(self) -> list[str]:
        return [
            str(self.install.binary),
            f"--model-repository={self.repository}",
            f"--backend-directory={self.install.backend_dir}",
            f"--grpc-port={self.grpc_port}",
            "--grpc-address=127.0.0.1",
            "--allow-http=false",
            "--allow-metrics=false",
            "--allow-gpu-metrics=false",
            "--allow-cpu-metrics=false",
            "--exit-timeout-secs=5",
            "--log-verbose=0",
            *self.extra_args,
        ]

    def start(self) -> None:
        if self.running:
            raise RuntimeError(f"tritonserver on {self.url} is already running")
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.install.environment(),
                start_new_session=True,
            )
        self.started_at_s = time.monotonic()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait_ready(self, timeout_s: float = 60.0) -> float:
        """Waits for the server and all its models to be ready; returns seconds since start."""
        import tritonclient.grpc as triton_grpc

        deadline = time.monotonic() + timeout_s
        with triton_grpc.InferenceServerClient(self.url) as client:
            while time.monotonic() < deadline:
                if not self.running:
                    raise TritonUnavailable(
                        f"tritonserver on {self.url} exited ({self._exit_code()}):\n{self.log_tail()}"
                    )
                with contextlib.suppress(Exception):
                    if client.is_server_ready(client_timeout=2.0):
                        return time.monotonic() - self.started_at_s
                time.sleep(0.1)
        raise TritonUnavailable(
            f"tritonserver on {self.url} not ready after {timeout_s:.0f}s:\n{self.log_tail()}"
        )

    def _exit_code(self) -> str:
        return "never started" if self.process is None else f"exit code {self.process.poll()}"

    def kill(self) -> None:
        """SIGKILL to the server and its stubs: a crash, as a failover test wants it. The shared
        memory regions the stubs leave in /dev/shm are removed."""
        regions = self._shared_memory_regions()
        self._signal_group(signal.SIGKILL)
        if self.process is not None:
            self.process.wait(30)
        for region in regions:
            with contextlib.suppress(OSError):
                (Path("/dev/shm") / region).unlink()

    def _shared_memory_regions(self) -> list[str]:
        """The /dev/shm regions named on the command lines of the server's Python stubs."""
        if self.process is None or not Path("/proc").is_dir():
            return []
        regions = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[2]) != self.process.pid:  # the process group
                    continue
                cmdline = (stat.parent / "cmdline").read_bytes().split(b"\0")
                regions += [
                    arg.decode()
                    for arg in cmdline
                    if arg.startswith(b"triton_python_backend_shm_region_")
                ]
        return regions

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGINT (Triton's graceful shutdown), then SIGKILL after timeout_s."""
        if not self.running:
            self._signal_group(signal.SIGKILL)  # stubs a crashed server may have left
            return
        self._signal_group(signal.SIGINT)
        assert self.process is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout_s)
        self.kill()  # the stubs, if any outlived it

    def _signal_group(self, signum: int) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signum)

    def log_tail(self, lines: int = 30) -> str:
        if not self.log_path.is_file():
            return "(no log)"
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.harness.triton_local",
        description="Serve a segserve model repository with the tritonserver of a Triton venv "
        "(CPU, Python backend: ONNX models are wrapped to run with onnxruntime).",
    )
    parser.add_argument("--repository", type=Path, default=Path("model_repository"))
    parser.add_argument("--grpc-port", type=int, default=8001)
    parser.add_argument("--triton-venv", type=Path, default=DEFAULT_VENV)
    parser.add_argument("--model", action="append", help="serve only these models (repeatable)")
    args = parser.parse_args(argv)
    try:
        install = TritonInstall.find(args.triton_venv)
    except TritonUnavailable as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="triton-repository-") as tmp:
        names = write_python_backend_repository(args.repository, Path(tmp), args.model)
        server = TritonProcess(
            install, Path(tmp), grpc_port=args.grpc_port, log_path=Path(tmp) / "triton.log"
        )
        server.start()
        try:
            seconds = server.wait_ready()
            print(
                f"tritonserver ready on {server.url} in {seconds:.1f}s serving {', '.join(names)}"
            )
            print(f"log: {server.log_path}; Ctrl-C stops it")
            assert server.process is not None
            server.process.wait()
        except KeyboardInterrupt:
            pass
        except TritonUnavailable as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
