"""`llmrl models`: the list, and --prepare into an empty cache (a real conversion of `tiny`)."""
from __future__ import annotations

import json
from pathlib import Path

from llmrl.cli import main
from llmrl.model_catalog import catalog, count_params
from llmrl.models import BUILTIN_MODELS, BUILTIN_PARAMS, resolve_model_path


def test_prepare_caches_into_an_empty_cache_and_the_list_says_so(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMRL_CACHE", str(tmp_path))
    assert main(["models", "--json"]) == 0
    before = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    assert set(before) == set(BUILTIN_MODELS) and not any(e["cached"] for e in before.values())
    assert main(["models", "--prepare", "tiny"]) == 0
    assert capsys.readouterr().out.startswith(f"prepared tiny: {tmp_path / 'models' / 'tiny-v2'} (3.2M parameters)")
    assert (tmp_path / "models" / "tiny-v2" / "config.json").exists()
    assert main(["models"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split()[:3] == ["name", "params", "cached"]
    tiny = next(line for line in table if line.startswith("tiny"))
    assert tiny.split()[1:3] == ["3.2M", str(tmp_path / "models" / "tiny-v2")]


def test_registered_parameter_counts_match_the_weights():
    """What the list shows before a model is cached is what its weights hold once it is. The
    count by hand for tiny: 49152 x 64 embedding (tied, once) + 2 layers x (q 64x64, k and v
    64x32 each, o 64x64, gate/up/down 3 x 64x128, two norms of 64) + the final norm of 64."""
    layer = 64 * 64 + 2 * 64 * 32 + 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert BUILTIN_PARAMS["tiny"] == 49152 * 64 + 2 * layer + 64
    for entry in catalog():
        if entry.cached or entry.name == "tiny":
            assert count_params(Path(resolve_model_path(entry.name))) == BUILTIN_PARAMS[entry.name], entry.name


def test_prepare_of_an_unknown_name_is_exit_2(capsys):
    assert main(["models", "--prepare", "gpt5"]) == 2
    assert "'gpt5' is not a built-in model (smollm2-135m, tiny)" in capsys.readouterr().err
