"""The Python API: README's "From Python" block runs as written, on real photos and weights."""

import re
import sys

from conftest import REPO, SHARED


def _readme_block(title: str) -> str:
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split(f"## {title}\n", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readmes_python_block_runs_as_written(tmp_path, monkeypatch, capsys, keras_home, flowers5):
    """From a checkout's root (configs/ here, ../shared beside it): extract, two heads compared, one image scored."""
    checkout = tmp_path / "checkout"
    checkout.mkdir()
    (checkout / "configs").symlink_to(REPO / "configs")
    (tmp_path / "shared").symlink_to(SHARED)
    monkeypatch.chdir(checkout)
    exec(compile(_readme_block("From Python"), "README.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines[:2]] == ["logreg", "dense"]
    for line in lines[:2]:
        assert float(line.split()[-1]) > 0.6, line  # MobileNet 0.25's ImageNet features tell these flowers apart
    photo, label = lines[2].split()
    assert label in {path.name for path in (flowers5 / "train").iterdir()}
    (run,) = (checkout / "runs" / "flowers5").iterdir()
    assert (run / "run.json").is_file() and sorted(p.name for p in checkout.iterdir()) == ["cache", "configs", "runs"]


def test_the_package_exports_every_stage_and_imports_them_lazily():
    import subprocess

    code = ("import sys, pipeline\n"
            "assert 'sklearn' not in sys.modules and 'tensorflow' not in sys.modules\n"
            "from pipeline import (Config, DenseHead, LogisticRegressionHead, Run, export, extract, load_config,\n"
            "    load_features, predict, report, train)\n"
            "assert all(map(callable, (export, extract, load_config, load_features, predict, report, train)))\n"
            "import pipeline.extract\n"
            "assert pipeline.extract is extract and extract.run_extract\n"
            "assert 'tensorflow' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


def test_run_opens_a_trained_run(tmp_path, tiny_dataset):
    from conftest import tiny_config
    from pipeline import Run, extract, report, train
    from pipeline.heads.logreg import LogisticRegressionHead
    from pipeline_helpers import KeptExtractor

    config = tiny_config(tmp_path, tiny_dataset)
    extract(config, progress=False, make_extractor=KeptExtractor)
    result = train(config)
    assert result.run_dir is None and not (tmp_path / "runs").exists()  # in memory until saved
    run = Run.open(result.save())
    assert isinstance(run.head, LogisticRegressionHead) and run.labels == result.labels
    assert run.config == config and run.metrics is None and run.backbone.name == "mobilenet"
    metrics = report(run)
    assert metrics["split"] == "test" and 0 <= metrics["accuracy"] <= 1
    assert not (run.dir / "report").exists()  # report(run) writes nothing; `make report` does
