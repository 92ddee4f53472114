"""The deployment files of tools/deploy/ and the Dockerfile against the server they deploy.

The Grafana dashboard's and the autoscaler's PromQL name only metrics that a real server exports
(scraped after real requests); the compose stack and the Kubernetes manifests parse, set only
SEGSERVE_* variables that are Settings fields (with values Settings accepts), and wire the ports
those settings give; the probes are gRPC health on the gRPC port. No docker or Kubernetes runs
here: what they would do with these files is untested (docs/deploy.md says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from segserve.v1 import segserve_pb2 as pb
from segserve_server.server import LIVENESS_SERVICE
from segserve_server.settings import Settings
from tests.conftest import ROOT, encode, quadrant_image

DEPLOY = ROOT / "tools" / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "segserve.json"
PNG = encode(quadrant_image())

# Exported only by a server that has a GPU (NVML sees one): excused from the scrape check where
# this machine has none, required where it has one.
GPU_ONLY_METRICS = frozenset(
    {
        "segserve_gpu_utilization_ratio",
        "segserve_gpu_memory_used_bytes",
        "segserve_gpu_memory_total_bytes",
    }
)

# ---- PromQL: the metric names an expression selects ----------------------------------------

_STRINGS = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_TEMPLATES = re.compile(r"<<[^<>]*>>")  # prometheus-adapter's <<.LabelMatchers>> etc.
_GROUPING = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", re.IGNORECASE
)
_NAME = re.compile(r"(?<![\w:$.])[A-Za-z_:][\w:]*(?![\w:])(?!\s*\()")
_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"offset", "bool", "inf", "nan", "start", "end"}
)
_COUNTER_FUNCTIONS = re.compile(r"\b(?:rate|irate|increase)\s*\(\s*([A-Za-z_:][\w:]*)")


def metric_names(expr: str) -> set[str]:
    """The metric names selected in a PromQL expression: identifiers that are not functions or
    aggregations (followed by "("), keywords, label names (inside {...} or by/without/on/
    ignoring/group_* lists), durations ([...]), strings or Grafana variables ($x)."""
    text = _TEMPLATES.sub("{}", _STRINGS.sub('""', expr))
    text = _RANGES.sub("", _MATCHERS.sub("", text))
    text = _GROUPING.sub("", text)
    return {name for name in _NAME.findall(text) if name.lower() not in _KEYWORDS}


def rated_names(expr: str) -> set[str]:
    """Names that rate(), irate() or increase() are applied to."""
    return set(_COUNTER_FUNCTIONS.findall(_STRINGS.sub('""', expr)))


def variable_expr(query: str) -> str:
    """The PromQL inside a Grafana variable query: label_values(EXPR, label) gives EXPR,
    label_values(label) none; query_result(EXPR) gives EXPR."""
    query = query.strip()
    if match := re.fullmatch(r"label_values\((.*),\s*\w+\s*\)", query, re.DOTALL):
        return match.group(1)
    if re.fullmatch(r"label_values\(\s*\w+\s*\)", query):
        return ""
    if match := re.fullmatch(r"query_result\((.*)\)", query, re.DOTALL):
        return match.group(1)
    return query


class Scrape:
    """One /metrics scrape: every sample name, and the type of the family it belongs to."""

    def __init__(self, text: str) -> None:
        self.types: dict[str, str] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                self.types[sample.name] = family.type

    def problems(self, expr: str, excused: frozenset[str] = frozenset()) -> list[str]:
        """What is wrong with `expr` against this scrape. Names are compared with the sample
        names as served, so the suffix must be the right one for the family's type: a histogram
        named without _bucket/_sum/_count, or a counter without _total, selects nothing and is
        reported. rate()/increase() must be applied to a counter's or histogram's samples."""
        found = []
        for name in sorted(metric_names(expr) - excused):
            if name not in self.types:
                found.append(f"{name} is not in the scrape (in {expr!r})")
        for name in sorted(rated_names(expr) - excused):
            kind = self.types.get(name)
            if kind is not None and (
                kind not in ("counter", "histogram") or name.endswith("_created")
            ):
                found.append(f"rate/increase over {name}, a {kind} sample (in {expr!r})")
        return found


def gpu_present() -> bool:
    """A GPU that NVML (nvidia-ml-py) or nvidia-smi sees."""
    with contextlib.suppress(Exception):
        import pynvml

        pynvml.nvmlInit()
        try:
            return bool(pynvml.nvmlDeviceGetCount() > 0)
        finally:
            pynvml.nvmlShutdown()
    if shutil.which("nvidia-smi") is None:
        return False
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        listed = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30)
        return listed.returncode == 0 and "GPU" in listed.stdout
    return False


def dashboard_queries(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target, nested row panels too, and every query variable."""

    def walk(panels: list[dict[str, Any]]) -> Iterator[tuple[str, str]]:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
            yield from walk(panel.get("panels", []))

    yield from walk(dashboard["panels"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            text = query["query"] if isinstance(query, dict) else query
            yield f"variable {variable['name']!r}", variable_expr(text)


def adapter_queries() -> Iterator[tuple[str, str]]:
    config_map = load_yaml(K8S / "prometheus-adapter.yaml")[0]
    for rule in yaml.safe_load(config_map["data"]["config.yaml"])["rules"]:
        yield "adapter seriesQuery", rule["seriesQuery"]
        yield "adapter metricsQuery", rule["metricsQuery"]


# ---- the files ---------------------------------------------------------------------------


def load_yaml(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def settings_from_env(env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Settings as the server would build them from these variables (the repository path is
    the container's own, so a real directory stands in for it); every name must be a field."""
    fields = {f"SEGSERVE_{name.upper()}" for name in Settings.model_fields}
    unknown = sorted(name for name in env if name.startswith("SEGSERVE_") and name not in fields)
    assert not unknown, f"not segserve settings: {unknown}"
    with monkeypatch.context() as patch:
        for name in fields:
            patch.delenv(name, raising=False)
        for name, value in env.items():
            if name.startswith("SEGSERVE_"):
                patch.setenv(name, value)
        values: dict[str, object] = {"model_repository": ROOT / "model_repository"}
        return Settings(**values)  # type: ignore[arg-type]


def compose_env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def volume(spec: str) -> tuple[str, str]:
    """A compose short volume (SOURCE:TARGET[:MODE]; SOURCE may hold ${VAR:-default})."""
    source, target = re.sub(r":(?:ro|rw)$", "", spec).rsplit(":", 1)
    return source, target


def container_env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: str(item["value"]) for item in container.get("env", [])}


def kinds(paths: list[Path]) -> dict[tuple[str, str], dict[str, Any]]:
    """Kubernetes objects by (kind, name); kustomization.yaml (no metadata) is left out."""
    return {
        (d["kind"], d["metadata"]["name"]): d
        for p in paths
        for d in load_yaml(p)
        if "metadata" in d
    }


def container_port(container: dict[str, Any], name: str) -> int:
    ports = {p["name"]: int(p["containerPort"]) for p in container["ports"]}
    return ports[name]


# ---- the dashboard against a real server --------------------------------------------------


def scrape_text(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return str(response.read().decode())


async def wait_for_samples(port: int, names: set[str]) -> Scrape:
    """Scrapes until every name in `names` has a sample (the answers that count them are sent
    just after the counts; an extreme bound, not a timing assertion)."""
    deadline = time.monotonic() + 60
    while True:
        scrape = Scrape(await asyncio.to_thread(scrape_text, port))
        missing = names - scrape.types.keys()
        if not missing or time.monotonic() > deadline:
            return scrape
        await asyncio.sleep(0.05)


async def test_every_dashboard_query_names_metrics_the_server_exports(server, stub):
    # Traffic that makes every family the dashboard shows have samples: a good and a bad
    # request, and a stream whose frames are answered OK and ERROR.
    await stub.Segment(pb.SegmentRequest(model="colour", image=pb.Image(encoded=PNG)))
    with pytest.raises(grpc.aio.AioRpcError) as bad:
        await stub.Segment(pb.SegmentRequest(model="colour", image=pb.Image(encoded=b"junk")))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    now_us = int(time.time() * 1e6)
    frames = [
        pb.SegmentStreamRequest(
            frame_id=i,
            capture_time_us=now_us,
            request=pb.SegmentRequest(
                model="colour", image=pb.Image(encoded=PNG if i != 1 else b"junk")
            ),
        )
        for i in range(3)
    ]
    answers = [answer async for answer in stub.SegmentStream(iter(frames))]
    assert [a.status for a in answers] == [
        pb.FRAME_STATUS_OK,
        pb.FRAME_STATUS_ERROR,
        pb.FRAME_STATUS_OK,
    ]

    queries = list(dashboard_queries(json.loads(DASHBOARD.read_text()))) + list(adapter_queries())
    used = set().union(*(metric_names(expr) for _, expr in queries))
    assert {"segserve_requests_total", "segserve_request_duration_seconds_bucket"} <= used
    assert used >= GPU_ONLY_METRICS, "the GPU panels are missing"
    excused = frozenset() if gpu_present() else GPU_ONLY_METRICS
    scrape = await wait_for_samples(server.metrics_port, used - excused)
    problems = [f"{where}: {p}" for where, expr in queries for p in scrape.problems(expr, excused)]
    assert not problems, "\n".join(problems)


def test_the_check_catches_wrong_names_suffixes_and_rates():
    scrape = Scrape(
        "# TYPE x_requests_total counter\nx_requests_total 1\n"
        '# TYPE x_seconds histogram\nx_seconds_bucket{le="+Inf"} 1\nx_seconds_sum 1\n'
        "x_seconds_count 1\n# TYPE x_depth gauge\nx_depth 0\n"
    )
    assert scrape.problems('sum by (le) (rate(x_seconds_bucket{a="b"}[5m]))') == []
    assert scrape.problems("rate(x_requests_total[$__rate_interval]) / x_depth") == []
    assert scrape.problems("rate(x_request_total[5m])")[0].startswith("x_request_total is not")
    assert scrape.problems("histogram_quantile(0.9, rate(x_seconds[5m]))")  # no _bucket
    assert scrape.problems("x_requests")  # a counter's family name selects no series
    assert "a gauge sample" in scrape.problems("rate(x_depth[5m])")[0]
    assert scrape.problems("gpu_thing", frozenset({"gpu_thing"})) == []


def test_metric_names_skips_functions_labels_keywords_and_variables():
    expr = (
        'histogram_quantile(0.99, sum by (le, stage) (rate(a_bucket{job=~"$job", '
        'stage!="x y"}[$__rate_interval]))) / on(instance) group_left(model) b:c_total '
        "offset 5m > bool 1e3 unless sum(rate(d_total[5m])) without (code)"
    )
    assert metric_names(expr) == {"a_bucket", "b:c_total", "d_total"}
    assert metric_names("process_open_fds") == {"process_open_fds"}
    assert metric_names("sum(x{<<.LabelMatchers>>}) by (<<.GroupBy>>)") == {"x"}
    assert variable_expr('label_values(m{job=~"$job"}, instance)') == 'm{job=~"$job"}'
    assert variable_expr("label_values(job)") == ""


# ---- compose -----------------------------------------------------------------------------


def test_compose_stack_wires_segserve_to_two_tritons_prometheus_and_grafana(monkeypatch):
    compose = load_yaml(DEPLOY / "compose.yaml")[0]
    services = compose["services"]
    assert {"segserve", "triton-0", "triton-1", "prometheus", "grafana"} <= services.keys()
    segserve = services["segserve"]
    settings = settings_from_env(compose_env(segserve), monkeypatch)
    assert settings.default_backend == "triton"
    published = {int(str(p).rsplit(":", 1)[-1]) for p in segserve["ports"]}
    assert {settings.port, settings.kserve_port, settings.metrics_port} <= published
    assert segserve["build"]["context"] == "../.." and (DEPLOY / "../../Dockerfile").is_file()

    # Both Triton servers by their service names, on a port they expose; the same repository.
    assert len(settings.triton_urls) == 2
    for url in settings.triton_urls:
        host, port = url.rsplit(":", 1)
        assert host in services, url
        assert port in {str(p) for p in services[host]["expose"]}, url
        assert "--model-repository=/models" in services[host]["command"]
        assert services[host]["volumes"] == segserve["volumes"]
    repository, target = volume(segserve["volumes"][0])
    assert (repository, target) == ("${MODEL_REPOSITORY:-../../model_repository}", "/models")
    assert compose_env(segserve)["SEGSERVE_MODEL_REPOSITORY"] == target
    assert (DEPLOY / "../../model_repository").is_dir()

    # Prometheus scrapes the metrics port the settings give; Grafana reads that Prometheus and
    # loads the dashboard from where its provisioning looks.
    prometheus = load_yaml(DEPLOY / "prometheus.yml")[0]
    jobs = {job["job_name"]: job for job in prometheus["scrape_configs"]}
    assert jobs["segserve"]["static_configs"][0]["targets"] == [f"segserve:{settings.metrics_port}"]
    mounts = dict(volume(v) for v in services["prometheus"]["volumes"])
    assert mounts["./prometheus.yml"] == "/etc/prometheus/prometheus.yml"
    grafana = services["grafana"]
    grafana_mounts = {
        (DEPLOY / host).resolve(): target
        for host, target in map(volume, grafana["volumes"])
        if host.startswith(".")
    }
    source = load_yaml(DEPLOY / "grafana/provisioning/datasources/prometheus.yaml")[0]
    assert source["datasources"][0]["url"] == "http://prometheus:9090"
    assert "9090:9090" in services["prometheus"]["ports"]
    provider = load_yaml(DEPLOY / "grafana/provisioning/dashboards/segserve.yaml")[0]
    assert grafana_mounts[DASHBOARD.parent.resolve()] == provider["providers"][0]["options"]["path"]
    assert (
        grafana_mounts[(DEPLOY / "grafana/provisioning").resolve()] == "/etc/grafana/provisioning"
    )
    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == f"{provider['providers'][0]['options']['path']}/{DASHBOARD.name}"

    gpu = load_yaml(DEPLOY / "compose.gpu.yaml")[0]["services"]
    assert gpu["segserve"]["build"]["target"] == "gpu"
    assert gpu.keys() <= services.keys()


# ---- Kubernetes --------------------------------------------------------------------------


def test_k8s_manifests_probe_grpc_health_on_the_grpc_port(monkeypatch):
    paths = sorted(K8S.glob("*.yaml"))
    objects = kinds(paths)
    deployment = objects[("Deployment", "segserve")]
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    settings = settings_from_env(container_env(container), monkeypatch)
    assert container_port(container, "grpc") == settings.port
    assert container_port(container, "kserve") == settings.kserve_port
    assert container_port(container, "metrics") == settings.metrics_port
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(settings.metrics_port)
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == settings.port, probe
    for probe in ("startupProbe", "readinessProbe"):
        assert container[probe]["grpc"].get("service", "") == "", probe  # health "" (overall)
    assert container["livenessProbe"]["grpc"]["service"] == LIVENESS_SERVICE
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > settings.drain_timeout_s

    service = objects[("Service", "segserve")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    named = {p["name"] for p in container["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= named

    # Each Triton pod by name through the headless Service, on its gRPC port.
    triton = objects[("StatefulSet", "triton")]
    headless = objects[("Service", triton["spec"]["serviceName"])]
    assert headless["spec"]["clusterIP"] == "None"
    (triton_container,) = triton["spec"]["template"]["spec"]["containers"]
    grpc_port = container_port(triton_container, "grpc")
    expected = [
        f"{triton['metadata']['name']}-{i}.{headless['metadata']['name']}:{grpc_port}"
        for i in range(triton["spec"]["replicas"])
    ]
    assert settings.triton_urls == expected

    # The HPA scales this Deployment on the metric the adapter rule serves.
    hpa = objects[("HorizontalPodAutoscaler", "segserve")]
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    (pods,) = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    rules = yaml.safe_load(objects[("ConfigMap", "prometheus-adapter")]["data"]["config.yaml"])
    assert pods["metric"]["name"] in {r["name"]["as"] for r in rules["rules"]}

    kustomization = load_yaml(K8S / "kustomization.yaml")[0]
    assert all((K8S / r).is_file() for r in kustomization["resources"])


# ---- the Dockerfile ----------------------------------------------------------------------


def test_dockerfile_builds_cpu_by_default_beside_a_gpu_target():
    stages = re.findall(r"^FROM\s+(\S+)\s+AS\s+(\S+)$", (ROOT / "Dockerfile").read_text(), re.M)
    assert [name for _, name in stages] == ["gpu", "cpu"]  # the last stage is the default build
    assert all(re.search(r":[\w.-]+@sha256:[0-9a-f]{64}$", image) for image, _ in stages), stages
    texts = [(DEPLOY / "compose.yaml").read_text(), (K8S / "triton.yaml").read_text()]
    images = re.findall(r"image:\s*(\S+)", "\n".join(texts))
    pinned = [i for i in images if not i.startswith("segserve:")]
    assert pinned and all(re.search(r"@sha256:[0-9a-f]{64}$", i) for i in pinned), images
