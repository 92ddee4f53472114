"""config.pbtxt parsing (Triton's own ModelConfig proto), settings, and generated-code currency."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from segserve_server.cpus import available_cpus, cgroup_cpu_quota
from segserve_server.errors import ModelConfigError
from segserve_server.model_repository import parse_config, scan_repository
from segserve_server.settings import load_settings
from tests.conftest import ROOT
from tests.harness.synthetic_models import config_pbtxt


def parse(text: str, tmp_path: Path, labels: str = "a\nb\nc\nd\ne\n"):
    model_dir = tmp_path / "m"
    model_dir.mkdir(exist_ok=True)
    (model_dir / "labels.txt").write_text(labels)
    return parse_config(text, model_dir)


def test_full_config(tmp_path):
    text = config_pbtxt(
        "m", 32, 48, preferred_batch_sizes=(2, 4), max_queue_delay_us=500, max_queue_size=9
    )
    config = parse(text, tmp_path)
    assert (config.input_width, config.input_height, config.input_layout) == (48, 32, "NCHW")
    assert config.input_dtype == np.float32 and config.outputs_labels
    assert config.batching.max_batch_size == 8 and config.batching.preferred_batch_sizes == (2, 4)
    assert config.batching.max_queue_delay_us == 500 and config.batching.max_queue_size == 9
    assert [c.name for c in config.classes] == ["a", "b", "c", "d", "e"]
    assert config.mean == (0, 0, 0) and config.std == (1, 1, 1)
    assert config.model_filename == "model.onnx"


NHWC_UINT8 = """
max_batch_size: 0
input [ { name: "x" data_type: TYPE_UINT8 format: FORMAT_NHWC dims: [ 1, 20, 30, 3 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ 1, 3, 20, 30 ] } ]
parameters { key: "segserve.channel_order" value: { string_value: "bgr" } }
"""


def test_unbatched_nhwc_uint8_logits(tmp_path):
    config = parse(NHWC_UINT8, tmp_path, labels="")
    assert config.input_layout == "NHWC" and config.input_dtype == np.uint8
    assert (config.input_height, config.input_width) == (20, 30)
    assert not config.outputs_labels and [c.name for c in config.classes] == [
        "class_0",
        "class_1",
        "class_2",
    ]
    assert config.channel_order == "BGR" and config.batching.max_batch_size == 1
    assert not config.batching.enabled


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda t: t.replace("TYPE_FP32 format", "TYPE_STRING format"), "image inputs are"),
        (lambda t: t.replace("dims: [ 3, 32, 48 ]", "dims: [ 3, -1, -1 ]"), "fixed positive"),
        (lambda t: t.replace("dims: [ 32, 48 ]", "dims: [ 16, 48 ]"), "do not end with"),
        (lambda t: t.replace("TYPE_UINT8 dims", "TYPE_FP32 dims"), "integer type"),
        (lambda t: t.replace('"0,0,0"', '"0,0"'), "needs 3 values"),
        (lambda t: t.replace('"1,1,1"', '"1,0,1"'), "has a zero"),
        (lambda t: t.replace("220,40,40;", ""), "4 colours for 5 classes"),
        (lambda t: t.replace("220,40,40", "300,40,40"), "0..255"),
        (lambda t: t.replace('name: "m"', 'name: "other"'), "differs from its folder"),
        (
            lambda t: t.replace("max_batch_size: 8", "max_batch_size: 8 bogus_field: 1"),
            "does not parse",
        ),
        (
            lambda t: t.replace('label_filename: "labels.txt"', 'label_filename: "none.txt"'),
            "missing",
        ),
    ],
)
def test_invalid_configs_say_what_is_wrong(tmp_path, change, message):
    with pytest.raises(ModelConfigError, match=message):
        parse(change(config_pbtxt("m", 32, 48)), tmp_path)


def test_bundled_repository_parses():
    entries = scan_repository(ROOT / "model_repository")
    assert entries, "the bundled repository is empty"
    for entry in entries:
        assert entry.error is None, f"{entry.name}: {entry.error}"
        assert entry.versions_to_load


def test_settings_precedence(tmp_path, monkeypatch):
    config_file = tmp_path / "segserve.toml"
    config_file.write_text("port = 7000\nmetrics_port = 7001\nmax_image_side = 4000\n")
    monkeypatch.setenv("SEGSERVE_METRICS_PORT", "7100")
    settings = load_settings(config_file, model_repository=tmp_path, port=7200)
    assert (settings.port, settings.metrics_port, settings.max_image_side) == (7200, 7100, 4000)
    with pytest.raises(ValueError, match="not a directory"):
        load_settings(model_repository=tmp_path / "absent")
    with pytest.raises(ValueError, match="port"):
        load_settings(model_repository=tmp_path, port=70000)


def test_generated_protobuf_code_is_current():
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gen_proto.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr


def test_cpu_count_follows_the_container_quota(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_quota(tmp_path) == 2
    assert available_cpus(tmp_path) <= 2
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_quota(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_quota(tmp_path) == 3
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_quota(tmp_path) is None


def test_priority_levels_and_queue_policies_parse_as_triton_has_them(tmp_path):
    text = (
        config_pbtxt(
            "m",
            32,
            48,
            max_queue_size=9,
            priority_levels=0,
            extra="",
        ).replace(
            "default_queue_policy { max_queue_size: 9 }",
            "priority_levels: 3 default_priority_level: 2 "
            "default_queue_policy { max_queue_size: 9 default_timeout_microseconds: 5000 } "
            "priority_queue_policy { key: 1 value: { timeout_action: DELAY "
            "default_timeout_microseconds: 100 allow_timeout_override: true max_queue_size: 4 } }",
        )
        + 'parameters { key: "segserve.priority_streak_limit" value: { string_value: "3" } }'
    )
    priority = parse(text, tmp_path).batching.priority
    assert (priority.levels, priority.default_level, priority.streak_limit) == (3, 2, 3)
    assert priority.level_of(0) == 2 and priority.level_of(3) == 3 and priority.level_of(4) == 2
    assert priority.policy_of(2).max_queue_size == 9
    assert priority.policy_of(2).default_timeout_us == 5000
    level1 = priority.policy_of(1)
    assert (level1.timeout_action, level1.default_timeout_us, level1.max_queue_size) == (
        "DELAY",
        100,
        4,
    )
    assert level1.allow_timeout_override


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("priority_levels: 2 default_priority_level: 3", "default_priority_level 3"),
        ("priority_levels: 2 default_priority_level: 0", "default_priority_level 0"),
        (
            "priority_levels: 2 default_priority_level: 1 priority_queue_policy "
            "{ key: 5 value: { max_queue_size: 1 } }",
            "names level 5",
        ),
    ],
)
def test_bad_priority_settings_name_the_value(tmp_path, change, message):
    text = config_pbtxt("m", 32, 48, priority_levels=0).replace(
        "default_queue_policy", change + " default_queue_policy"
    )
    with pytest.raises(ModelConfigError, match=message):
        parse(text, tmp_path)
    bad_streak = config_pbtxt("m", 32, 48) + (
        'parameters { key: "segserve.priority_streak_limit" value: { string_value: "-2" } }'
    )
    with pytest.raises(ModelConfigError, match="priority_streak_limit = '-2'"):
        parse(bad_streak, tmp_path)


def test_the_bundled_models_have_a_real_time_level():
    for entry in scan_repository(ROOT / "model_repository"):
        assert entry.config is not None, entry.error
        priority = entry.config.batching.priority
        assert (priority.levels, priority.default_level) == (2, 2), entry.name
