"""benchmarks/throughput.py runs end to end on a tiny model and folder and reports every figure it promises (the
figures themselves are the benchmark's business, not the test's)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"


@pytest.fixture(scope="module")
def throughput():
    spec = importlib.util.spec_from_file_location("throughput_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _rate(result: dict) -> float:
    return result["images_per_s"]


def test_every_measurement_runs_and_the_ratios_are_sane(throughput, tmp_path: Path, tiny_config: Path,
                                                        tiny_weights: Path) -> None:
    folder = throughput.generate_folder(tmp_path / "generated", 12, classes=3, size=(48, 40))
    assert sorted(p.name for p in folder.iterdir()) == ["class_00", "class_01", "class_02"]
    settings = throughput.Settings(folder=str(folder), model=str(tiny_config), pretrained=str(tiny_weights),
                                   epochs=1, batch_size=4, threads=1, ceiling_steps=1, data_epochs=1)
    results = throughput.run_benchmark(settings, scratch=tmp_path / "scratch")
    json.dumps(results)  # the --json output
    assert results["research"]["images"] == 12 and results["research"]["steps"] == 3
    assert results["clipcl"]["images"] == 12 and results["clipcl"]["steps"] == 3
    assert results["clipcl"]["stages_s"].keys() >= {"decode", "train", "statistics"}
    assert results["ceiling"]["images"] == 4 and results["research_ceiling"]["images"] == 4
    data = results["data_path"]
    assert data["decode_every_epoch"]["images"] == 12 and data["clipcl_cached"]["images"] == 12
    assert data["clipcl_cached"]["build_s"] > 0 and not data["clipcl_cached"]["memory_mapped"]
    for result in (results["research"], results["research_ceiling"], results["clipcl"], results["ceiling"],
                   data["decode_every_epoch"], data["clipcl_cached"]):
        assert math.isfinite(_rate(result)) and _rate(result) > 0
    ratios = results["ratios"]
    assert set(ratios) == {"clipcl_vs_ceiling", "research_vs_its_ceiling", "clipcl_vs_research",
                           "data_cached_vs_decoding", "data_cached_vs_decoding_cpu"}
    cpu_ratio = ratios.pop("data_cached_vs_decoding_cpu")  # None where the clock's tick outlasts a tiny run
    assert cpu_ratio is None or cpu_ratio > 0
    assert ratios["clipcl_vs_ceiling"] == pytest.approx(_rate(results["clipcl"]) / _rate(results["ceiling"]),
                                                        abs=1e-3)
    assert all(math.isfinite(value) and value > 0 for value in ratios.values())
    assert "images/s" in throughput.summary(results)
    assert not (tmp_path / "scratch" / "subset").exists()  # all images used: the folder itself, no links


def test_the_command_line_limits_the_folder_and_writes_json(throughput, tmp_path: Path, tiny_config: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    folder = throughput.generate_folder(tmp_path / "generated", 9, classes=3, size=(40, 32))
    subset = throughput.limit_folder(folder, 4, tmp_path / "subset")
    assert sorted(len(list(c.iterdir())) for c in subset.iterdir()) == [1, 1, 2]  # classes taken in turn
    out = tmp_path / "out.json"
    code = throughput.main(["--folder", str(folder), "--model", str(tiny_config), "--images", "6", "--epochs", "1",
                            "--batch-size", "4", "--threads", "1", "--data-epochs", "1",
                            "--skip", "research,clipcl,ceiling", "--json", str(out)])
    assert code == 0
    results = json.loads(out.read_text())
    assert results["data_path"]["clipcl_cached"]["images"] == 6
    assert results["ratios"]["data_cached_vs_decoding"] > 0 and results["ratios"]["clipcl_vs_ceiling"] is None
    assert "data path" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        throughput.parse_args(["--folder", str(folder)])  # no --model
