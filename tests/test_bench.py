"""The benchmark's plumbing at a tiny size: every section runs and the JSON keeps its shape.

No timing is asserted (the machine is shared): speed is what the benchmark reports, not
what a test can check. A small MobileNet and a dozen JPEGs keep it quick.
"""

import json
import re
from pathlib import Path

import pytest

from pipeline import execution
from pipeline.bench import BenchOptions, child_stage, format_table, run_bench, write_json
from pipeline.extract import run_extract

from conftest import tiny_config, write_image


@pytest.fixture
def tiny_jpegs(tmp_path):
    """Two classes of JPEGs in train/val folders (the memory check repeats JPEGs)."""
    root = tmp_path / "photos"
    for c, name in enumerate(["ant", "bee"]):
        for i in range(6):
            write_image(root / ("val" if i % 3 == 0 else "train") / name / f"{i}.jpg", seed=10 * c + i, size=(90, 70))
    return root


def test_bench_runs_every_section_and_writes_its_json_contract(tmp_path, tiny_jpegs, keras_home):
    config = tiny_config(tmp_path, tiny_jpegs, **{"backbone.runtime": "auto"})  # MobileNet v1 0.25, batch size 8
    options = BenchOptions(images=tiny_jpegs, batch_sizes=(4, 8), ceiling_images=8, naive_images=2,
                           memory_sizes=(12, 24), small_images=16)
    write_json(run_bench(config, options), tmp_path / "bench.json")
    result = json.loads((tmp_path / "bench.json").read_text())

    assert result["machine"]["device"].startswith(("CPU: ", "GPU: "))
    assert {"tensorflow", "keras", "numpy", "h5py", "pillow", "python"} <= set(result["machine"]["versions"])
    assert len(result["load_before"]) == 3 and result["matmul_gflops"] > 0  # measured: only its uses are checked
    assert result["backbone"]["convolutions"] == 27  # MobileNet v1: 1 stem + 13 depthwise + 13 pointwise
    assert result["backbone"]["gflop_per_image"] == pytest.approx(0.0815, abs=1e-3)
    rates = {(row["stage"], row["precision"]): row for row in result["rates"]}
    assert set(rates) == {("naive", "float32"), ("ceiling", "float32"), ("pipeline", "float32"),
                          ("ceiling", "bfloat16"), ("pipeline", "bfloat16")}
    assert rates["pipeline", "bfloat16"]["images"] == 12, "the pipeline extracts every image from a cold cache"
    assert set(rates["ceiling", "float32"]["batch_sizes_tried"]) == {"4", "8"}
    assert {"tensorflow-graph batch 4", "tensorflow-xla batch 8"} <= set(rates["ceiling", "float32"]["paths_tried"])
    assert rates["pipeline", "float32"]["path"] in execution.PATHS, "the chosen path is recorded"
    for row in result["rates"]:  # each rate is what its own counts and times say
        assert row["images"] >= 2 and row["seconds"] > 0
        assert row["fraction_of_matmul"] == pytest.approx(row["gflops"] / result["matmul_gflops"])
        assert row["gflops"] == pytest.approx(row["img_per_s"] * result["backbone"]["gflop_per_image"], rel=1e-3)
        assert row["img_per_s"] == pytest.approx(row["images"] / row["seconds"])
        assert row["cpu_ms_per_image"] == pytest.approx(1000 * row["cpu_seconds"] / row["images"])
    assert 0 < rates["pipeline", "float32"]["backbone_busy"] <= 1
    assert rates["pipeline", "float32"]["startup_s"] > 0 and rates["pipeline", "float32"]["decode_cpu_ms_per_image"] > 0
    assert set(result["ratios"]) == {"pipeline_over_naive", "pipeline_over_ceiling", "pipeline_over_ceiling_cpu",
                                     "ceiling_over_naive", "pipeline_over_openvino_ceiling",
                                     "small_backbone_pipeline_over_ceiling", "cpu_bound_pipeline_over_ceiling",
                                     "small_backbone_cpu_bound_over_ceiling"}
    small = {row["stage"]: row for row in result["small_backbone_rates"]}
    cores, per_image_ms = result["machine"]["cores"], small["pipeline"]["decode_cpu_ms_per_image"] + \
        small["ceiling"]["cpu_ms_per_image"]
    assert result["ratios"]["small_backbone_cpu_bound_over_ceiling"] == pytest.approx(
        min(1.0, cores * 1000 / per_image_ms / small["ceiling"]["img_per_s"])), "decode and backbone share the cores"
    small = {row["stage"]: row for row in result["small_backbone_rates"]}
    assert small["pipeline"]["images"] == 12 and small["pipeline"]["path"].split("-")[0] in ("tensorflow", "openvino")
    race = result["small_images"]
    assert race["images"] == 16 and race["ours"]["wall_s"] > 0 and race["tutorial"]["wall_s"] > 0
    assert race["ours"]["peak_rss_mib"] > 50 and race["tutorial"]["peak_rss_mib"] > 50
    assert result["logreg_fit"]["shape"] == [5000, 256, 97] and result["logreg_fit"]["val_accuracy"] > 0.5
    # OpenVINO (in the test extra) is timed beside TensorFlow, in the ceiling and on its own table
    assert any(name.startswith("openvino-") for name in rates["ceiling", "float32"]["paths_tried"])
    runtimes = result["runtimes"]
    assert {row["path"] for row in runtimes["rows"]} == {"tensorflow-graph", "tensorflow-xla", "openvino-throughput",
                                                        "openvino-latency"}
    assert sum(row["best"] for row in runtimes["rows"]) == 1 and runtimes["openvino_over_tensorflow"] > 0
    assert result["ratios"]["pipeline_over_openvino_ceiling"]["bfloat16"] > 0
    flags = re.findall(r"\b(avx512_bf16|amx_bf16|bf16)\b", Path("/proc/cpuinfo").read_text())
    assert result["machine"]["cpu_native_bfloat16"] is bool(flags)

    assert [run["images"] for run in result["memory"]["runs"]] == [12, 24]
    assert all(run["peak_rss_mib"] > 50 for run in result["memory"]["runs"])
    assert result["rerun"]["imported_tensorflow"] is False and result["train"]["imported_tensorflow"] is False
    assert result["train"]["features"] == "mobilenet, weights ImageNet"

    agreement = result["agreement"]
    assert agreement["float32"]["mean_cosine"] == pytest.approx(1.0)
    assert agreement["bfloat16"]["min_cosine"] > 0.95, "bf16 features must stay close to float32 ones"
    assert agreement["float16_storage"]["min_cosine"] > 0.9999
    assert agreement["openvino_float32"]["min_cosine"] > 0.9999 and agreement["openvino_bfloat16"]["reference"] == "bfloat16"
    assert agreement["openvino_float32"]["max_probability_difference"] <= 1e-4, "export parity's tolerance"
    assert agreement["float16_storage"]["bytes_per_row"] * 2 == agreement["float32"]["bytes_per_row"] == 256 * 4
    compression = result["compression"]
    assert compression["none"]["bytes"] >= 48 * 256 * 4 and compression["none"]["saved"] == 0
    for name in ("lzf", "gzip"):
        assert 0 < compression[name]["bytes"] <= 1.05 * compression["none"]["bytes"] and compression[name]["write_s"] > 0
        assert compression[name]["saved"] == pytest.approx(1 - compression[name]["bytes"] / compression["none"]["bytes"])
    assert all(isinstance(check["met"], bool) for check in result["targets"].values())
    assert result["targets"]["logreg train imports TensorFlow"]["met"] is True
    naive_target = result["targets"]["pipeline/naive float32"]
    assert naive_target["reachable"] == pytest.approx(result["ratios"]["ceiling_over_naive"]["float32"])
    table = format_table(result)
    assert "| pipeline | bfloat16 |" in table and "targets:" in table and "**best**" in table


def test_train_with_logreg_head_does_not_import_tensorflow(tmp_path, tiny_dataset):
    config = tiny_config(tmp_path, tiny_dataset, **{"head.kind": "logreg"})
    run_extract(config, progress=False)
    train = child_stage(config, tmp_path, "train")
    assert train["imported_tensorflow"] is False
    assert len(list((tmp_path / "runs" / "tiny").glob("*/head.h5"))) == 1


def test_head_bench_compares_every_head_with_plain_over_untuned_splits():
    """The head benchmark on separable synthetic features: every head is scored on the held-out
    folder in every split, the table has a row per head, and the heads beat chance."""
    import numpy as np

    from pipeline.config import LogRegConfig
    from pipeline.head_bench import run, table

    rng = np.random.default_rng(0)
    n, dim, views = 120, 16, 2
    y = np.arange(n) % 3
    X = np.abs(rng.normal(size=(n, dim)) + 3 * np.eye(3, dim)[y]).astype(np.float32)
    data = {"X": X, "views": X[:, None, :] + rng.normal(scale=0.1, size=(n, views + 1, dim)).astype(np.float32),
            "keys": [f"{i:064x}" for i in range(n)], "y": y,
            "split": np.array(["train"] * 90 + ["val"] * 30)}
    results = run(data, 2, LogRegConfig(c_values=[0.1, 1.0]))
    assert len(results) == 6 and all(len(result["accuracy"]) == 2 for result in results.values())
    assert all(min(result["accuracy"]) > 0.6 for result in results.values())
    rendered = table(results, 30)
    assert rendered.count("\n| ") == len(results) and "one image = 3.33 points" in rendered
