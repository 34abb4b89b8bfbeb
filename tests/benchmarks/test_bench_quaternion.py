"""benchmarks/bench_quaternion.py on its quick shapes: the layer table a GPU node fills in fp32 and bf16."""

from __future__ import annotations

import importlib.util
import math

import pytest

from tests.conftest import REPO


def load_benchmark():
    path = REPO / "benchmarks" / "bench_quaternion.py"
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return load_benchmark()


def test_quick_table_has_every_shape_in_each_precision(bench):
    rows = bench.run(quick=True, device="cpu", precisions=("fp32", "bf16"))
    shapes = [bench.LayerShape(*s) for s in bench.QUICK_SHAPES]
    for precision, where in (("fp32", ""), ("bf16", ", cpu bf16")):
        for shape in shapes:
            case = f"{shape.label()}{where} (x1 per joint forward)"
            metrics = {r["metric"]: r for r in rows if r["case"] == case}
            reference = "nn.Conv3d" if shape.kind == "conv" else "nn.ConvTranspose3d"
            auto = metrics[f"auto / {reference}"]
            # auto's time is that of the path the layer resolves to, so its ratio is that path's ratio
            path = auto["note"].removeprefix("auto = ").removesuffix(" on cpu")
            assert auto["value"] == metrics[f"{path} / {reference}"]["value"]
            assert precision in metrics["dense quaternion fwd+bwd"]["note"]
            assert all(math.isfinite(r["value"]) and r["value"] > 0 for r in metrics.values())
        summary = {r["metric"]: r["value"] for r in rows if r["case"] == f"the quick shapes, one of each{where}"}
        dense = summary["dense quaternion"]
        assert summary["auto / dense"] == pytest.approx(summary["auto quaternion"] / dense)
        assert summary["fast / dense"] == pytest.approx(summary["fast quaternion, every layer"] / dense)


def test_gpu_grids_are_timed_whole(bench):
    shape = bench.LayerShape("conv", 12, 12, 3, 1, (256, 256, 16))
    assert shape.timed_grid == (32, 64, 16) and shape.crop_factor == 32
    whole = shape._replace(max_voxels=None)
    assert whole.timed_grid == (256, 256, 16) and whole.crop_factor == 1
