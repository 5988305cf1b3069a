"""`llmrl plot`: the figure's series read back through matplotlib's objects equal metrics.jsonl."""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmrl.cli import main
from llmrl.plot import plot_runs, read_run_metrics

REPO = Path(__file__).resolve().parents[1]
TINY = [
    "model.name=tiny", "rollout.n=4", "train.prompts_per_step=2", "train.micro_batch_size=4", "rollout.max_new_tokens=8",
    "logging.progress=false", "logging.tensorboard=false", "eval.benches=[]", "train.steps=3",
]


def lines_by_title(fig) -> dict[str, dict[str, tuple[list, list]]]:
    return {ax.get_title(): {ln.get_label(): (list(ln.get_xdata()), list(ln.get_ydata())) for ln in ax.get_lines()} for ax in fig.axes}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> Iterator[list[Path]]:
    root = tmp_path_factory.mktemp("plot")
    for recipe in ("quickstart", "arith_ppo"):
        assert main(["train", str(REPO / "recipes" / f"{recipe}.yaml"), *TINY, f"output_dir={root / recipe}"]) == 0
    yield [root / "quickstart", root / "arith_ppo"]
    shutil.rmtree(root, ignore_errors=True)  # the runs' checkpoints; a small CI disk fills otherwise


def test_two_runs_are_overlaid_and_every_series_equals_the_metrics_file(two_runs, tmp_path):
    fig = plot_runs(two_runs)
    panels = lines_by_title(fig)
    for title, key in (("reward", "reward/mean"), ("response length (tokens)", "response/length_mean"), ("truncated fraction", "response/truncated_frac")):
        assert set(panels[title]) == {"quickstart", "arith_ppo"}, title
        for run in two_runs:
            rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
            assert panels[title][run.name] == ([r["step"] for r in rows], [r[key] for r in rows]), (title, run.name)
    time_panels = [ax for ax in fig.axes if ax.get_title().startswith("time per step")]
    assert [ax.get_title() for ax in time_panels] == ["time per step (s): quickstart", "time per step (s): arith_ppo"]
    rows = [json.loads(line) for line in (two_runs[0] / "metrics.jsonl").read_text().splitlines()]
    tops = [max(p.get_y() + p.get_height() for p in time_panels[0].patches if p.get_x() < r["step"] < p.get_x() + p.get_width()) for r in rows]
    phases = [sum(v for k, v in r.items() if k.startswith("time/") and k != "time/step") for r in rows]
    assert tops == pytest.approx(phases)
    assert main(["plot", *map(str, two_runs), "--out", str(tmp_path / "both.png")]) == 0
    assert (tmp_path / "both.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_each_run_writes_curves_png_at_the_end(two_runs):
    for run in two_runs:
        assert (run / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_chosen_metrics_and_globs_and_a_missing_one(two_runs, capsys):
    fig = plot_runs(two_runs[1:], ["critic/*_mean"])
    (panel,) = fig.axes
    assert sorted(panel_lines := [ln.get_label() for ln in panel.get_lines()]) == sorted(
        f"arith_ppo {k}" for k in ("critic/returns_mean", "critic/values_mean", "critic/vpred_mean")
        if k in read_run_metrics(two_runs[1])[0]
    ), panel_lines
    assert main(["plot", str(two_runs[0]), "--metrics", "reward/mean,no/such"]) == 2
    assert capsys.readouterr().err.strip() == "llmrl: error: no run logged no/such"


def test_a_run_in_progress_and_a_resumed_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [{"step": 1, "reward/mean": 0.1}, {"step": 2, "reward/mean": 0.2}, {"step": 2, "reward/mean": 0.25}, {"step": 3, "reward/mean": 0.3}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "rew')  # torn last line
    fig = plot_runs([run])
    assert lines_by_title(fig)["reward"]["run"] == ([1, 2, 3], [0.1, 0.25, 0.3])  # a step logged twice keeps its last row


def test_not_a_run_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err
