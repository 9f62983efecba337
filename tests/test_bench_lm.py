"""``benchmarks.lm --quick`` trains, lowers the validation loss and writes its outputs."""

import json
import math

import pytest

pytest.importorskip("matplotlib")

from benchmarks import lm  # noqa: E402


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm")
    record = lm.main(["--quick", "--output-dir", str(out), "--results-md", str(out / "R.md")])
    return record, out


def test_quick_run_lowers_the_validation_loss_without_non_finite_values(quick_run):
    record, _ = quick_run
    assert len(record["optimizers"]) == 2
    for name, result in record["optimizers"].items():
        for run in result["runs"]:
            assert not run["diverged"], name
            values = run["val_loss"] + run["train_loss"]
            assert all(math.isfinite(v) for v in values), name
            assert run["val_loss"][-1] < run["val_loss"][0], name
            assert run["steps"][-1] == record["steps"]


def test_quick_run_writes_json_figure_and_section(quick_run):
    record, out = quick_run
    assert json.loads((out / "lm.json").read_text())["steps"] == record["steps"]
    assert (out / "lm.png").stat().st_size > 0
    section = (out / "R.md").read_text()
    assert lm.BEGIN in section and lm.END in section
    assert all(name in section for name in record["optimizers"])


def test_corpus_is_deterministic_and_split_by_position():
    first, second = lm.Data.build(5_000), lm.Data.build(5_000)
    assert first.train.equal(second.train) and first.val.equal(second.val)
    assert len(first.train) == int(0.9 * (len(first.train) + len(first.val)))
    assert int(first.train.max()) < len(first.vocab) and int(first.val.max()) < len(first.vocab)
