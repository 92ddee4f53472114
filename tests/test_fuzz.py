"""The fuzz harness (tools/fuzz.py), short: a few hundred derandomized inputs per target through
segserve's own parsing, sniffing and decoding; only SegserveError may come out, and no input
hangs. The long run (>= 100,000 inputs) is `python tools/fuzz.py`, see docs/fuzzing.md."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from tritonclient.grpc import service_pb2 as kserve

from segserve_server.adapters.kserve_tensors import decode_inputs
from segserve_server.core.tensor_types import TensorSpec
from segserve_server.errors import InvalidArgument
from segserve_server.pipeline.decode import decode

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = 200  # per target: under a second each on an idle machine
HANG_S = 30.0  # far past any input's time (milliseconds): only a hang reaches it


def load_tool() -> tuple[ModuleType, ModuleType]:
    """tools/fuzz.py (the runner) and tools/fuzz_targets.py, with tools/ on sys.path while they
    load, as when run as a script."""
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        spec = importlib.util.spec_from_file_location("segserve_fuzz", ROOT / "tools" / "fuzz.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
        return module, importlib.import_module("fuzz_targets")
    finally:
        sys.path.remove(str(ROOT / "tools"))


fuzz, targets = load_tool()


@pytest.fixture(scope="module")
def tensor_api() -> Iterator[object]:
    """The KServe target's real TensorAPI (the bundled synthetic model, loaded)."""
    with targets.LoadedTensorAPI() as api:
        yield api


@pytest.mark.parametrize("name", list(targets.TARGETS))
def test_target_raises_only_segserve_errors(name, tensor_api):
    tally = fuzz.run_target(targets.TARGETS[name], EXAMPLES, fuzz.Tally(), random_seed=None)
    assert tally.inputs >= EXAMPLES
    bugs = "\n".join(f"{kind}: {trace}" for kind, (_, trace) in tally.bugs.items())
    assert tally.bug_count == 0, bugs
    assert tally.slowest_s < HANG_S
    # The inputs reach past the first check: some parse (or decode), some are refused.
    assert tally.outcomes["ok"] > 0, tally.outcomes
    assert tally.outcomes["InvalidArgument"] > 0, tally.outcomes


def test_every_seed_is_a_real_image_that_decodes():
    for name, data in targets.SEEDS.items():
        image = decode(data, targets.LIMITS)
        assert image.pixels.shape[2] == 3, name


def test_the_harness_counts_what_is_not_a_segserve_error():
    """A target that raises ValueError on some inputs is reported, with its smallest input."""

    def flaky(data: bytes) -> None:
        if len(data) % 3 == 0:
            raise ValueError("boom")
        raise InvalidArgument("refused")

    target = targets.Target("flaky", lambda: targets.mutated(targets.SEED_LIST), flaky)
    tally = fuzz.run_target(target, 100, fuzz.Tally(), random_seed=None)
    assert tally.bug_count > 0 and tally.outcomes["InvalidArgument"] > 0
    (case, trace) = tally.bugs["BUG ValueError"]
    assert len(case) % 3 == 0 and "boom" in trace
    report = fuzz.report({"flaky": tally}, 2.0, None)
    assert f"exceptions outside SegserveError: {tally.bug_count}" in report


@pytest.mark.parametrize("raw", [True, False], ids=["raw", "typed"])
def test_an_empty_tensor_too_big_for_numpy_is_invalid_argument(raw):
    """A fuzz finding (kserve_tensors): shape [0, 2**62] holds no element, so its contents
    check passed, and numpy's reshape raised ValueError (INTERNAL) for an input spec of dims
    [-1, -1]. The bundled and test models have fixed dims, hence a spec of its own here."""
    request = kserve.ModelInferRequest(model_name="m")
    request.inputs.add(name="x", datatype="FP32", shape=[0, 2**62])
    if raw:
        request.raw_input_contents.append(b"")
    with pytest.raises(InvalidArgument, match=r"shape \[0, 4611686018427387904\], larger than"):
        decode_inputs(request, [TensorSpec("x", "FP32", (-1, -1))])
