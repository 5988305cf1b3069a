"""The metrics regression check on the built-in SmolLM2: the quickstart recipe for 2 steps (no
final evaluation) must log what it logged before the seams refactor, every non-timing metric
within 1e-6. The tiny-model runs of the same check live in test_e2e.py's recipe test."""
import pytest

from test_e2e import regression_check


@pytest.mark.slow
def test_quickstart_on_smollm2_matches_the_recorded_metrics(tmp_path):
    regression = regression_check()
    recorded = regression.baseline()
    if recorded is None:
        pytest.skip(regression.no_baseline_message())
    if "smollm2/quickstart" not in recorded:
        pytest.skip(regression.missing_run_message("smollm2/quickstart"))
    path, overrides = regression.runs()["smollm2/quickstart"]
    got = regression.run_metrics(path, overrides, tmp_path)
    problems, _ = regression.compare("smollm2/quickstart", recorded["smollm2/quickstart"], got)
    assert not problems, "\n".join(problems)
