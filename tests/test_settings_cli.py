"""`segserve serve`'s flags come from the Settings fields: every field has one, with its
docstring as help and its default; the flags parse into the settings they name."""

from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from segserve_server.settings import Settings, load_settings
from segserve_server.settings_cli import add_settings_flags, flag_of, overrides_of
from tests.conftest import ROOT


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_settings_flags(p)
    return p


def test_every_setting_has_a_docstring_and_a_flag():
    help_text = subprocess.run(
        [sys.executable, "-m", "segserve_server.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={"COLUMNS": "1000", "PATH": ""},
    ).stdout
    assert len(Settings.model_fields) >= 24
    for name, field in Settings.model_fields.items():
        assert field.description and len(field.description) > 10, name
        assert flag_of(name, field) in help_text, name
        first_words = " ".join(field.description.split()[:4])
        assert first_words in " ".join(help_text.split()), name
        assert f"SEGSERVE_{name.upper()}" in help_text, name


def test_flags_parse_into_settings(tmp_path):
    args = parser().parse_args(
        [
            "--model-repository", str(ROOT / "model_repository"),
            "--port", "0",
            "--metrics-port", "off",
            "--kserve-port", "8123",
            "--no-jpeg-dct-scaling",
            "--triton-url", "a:1",
            "--triton-url", "b:2",
            "--ort-provider", "CPUExecutionProvider",
            "--triton-timeout-s", "2.5",
            "--log-level", "debug",
            "--default-backend", "triton",
        ]
    )  # fmt: skip
    settings = load_settings(None, **overrides_of(args))
    assert settings.port == 0 and settings.metrics_port is None and settings.kserve_port == 8123
    assert settings.jpeg_dct_scaling is False
    assert settings.triton_urls == ["a:1", "b:2"]
    assert settings.ort_providers == ["CPUExecutionProvider"]
    assert settings.triton_timeout_s == 2.5 and settings.log_level == "DEBUG"
    assert settings.default_backend == "triton"


def test_flags_not_given_leave_the_environment_and_defaults(monkeypatch):
    monkeypatch.setenv("SEGSERVE_DRAIN_TIMEOUT_S", "7")
    args = parser().parse_args(["--model-repository", str(ROOT / "model_repository")])
    assert set(overrides_of(args)) == {"model_repository"}
    settings = load_settings(None, **overrides_of(args))
    assert settings.drain_timeout_s == 7
    assert settings.port == Settings.model_fields["port"].default


def test_bad_values_are_named(capsys):
    with pytest.raises(SystemExit):
        parser().parse_args(["--port", "eighty"])
    assert "eighty" in capsys.readouterr().err
    with pytest.raises(ValueError, match="99999"):
        load_settings(None, model_repository=ROOT / "model_repository", port=99999)


def test_the_documented_settings_table_is_generated_from_the_fields():
    result = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "settings_table.py"), "--check",
         str(ROOT / "docs" / "configuration.md")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
