"""Recipes: overrides, defaults, and errors that name the key and the file (exit 2, no traceback)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmrl.algorithms import PRESETS
from llmrl.recipe import RecipeError, apply_overrides, dump_recipe, load_recipe, resolve_recipe

REPO = Path(__file__).resolve().parents[1]


def write(tmp_path, text, name="r.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_overrides_are_parsed_as_yaml():
    data = apply_overrides({}, ["train.lr=1e-6", "rollout.stop=[a,b]", "logging.tensorboard=false", "model.name=tiny"])
    assert data == {"train": {"lr": 1e-6}, "rollout": {"stop": ["a", "b"]}, "logging": {"tensorboard": False}, "model": {"name": "tiny"}}
    recipe = load_recipe(None, ["train.lr=1e-6", "train.steps=2", "rollout.stop=[a,b]"])
    assert recipe.train.lr == 1e-6 and recipe.train.steps == 2 and recipe.rollout.stop == ["a", "b"]


def test_shipped_recipes_validate():
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        load_recipe(str(path))


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    path = write(tmp_path, "train:\n  stepz: 3\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    msg = str(err.value)
    assert "train.stepz" in msg and path in msg and "did you mean 'train.steps'" in msg


def test_unknown_section_suggests(tmp_path):
    with pytest.raises(RecipeError, match="did you mean 'rollout'"):
        load_recipe(write(tmp_path, "rolout:\n  n: 2\n"))


def test_wrong_type_names_key(tmp_path):
    path = write(tmp_path, "train:\n  lr: fast\n")
    with pytest.raises(RecipeError, match=r"train\.lr: .*number.*'fast'.*r\.yaml"):
        load_recipe(path)


def test_missing_recipe_file():
    with pytest.raises(RecipeError, match="recipe file not found: nope.yaml"):
        load_recipe("nope.yaml")


def test_unknown_algorithm_and_reward(tmp_path):
    with pytest.raises(RecipeError, match="algorithm.name"):
        load_recipe(None, ["algorithm.name=grp0"])
    with pytest.raises(RecipeError, match=r"reward.functions\[0\].*gsm8kk"):
        load_recipe(None, ["reward.functions=[gsm8kk]"])
    with pytest.raises(RecipeError, match=r"reward.functions\[0\].*missing_file.py"):
        load_recipe(None, ["reward.functions=[missing_file.py:fn]"])


def test_batch_sizes_must_divide():
    with pytest.raises(RecipeError, match="mini_batch_size=24 must divide"):
        load_recipe(None, ["train.prompts_per_step=8", "rollout.n=8", "train.mini_batch_size=24"])
    with pytest.raises(RecipeError, match="micro_batch_size=5 must divide"):
        load_recipe(None, ["train.mini_batch_size=32", "train.micro_batch_size=5"])
    load_recipe(None, ["train.mini_batch_size=32", "train.micro_batch_size=8"])


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "llmrl.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_validate_prints_every_default(tmp_path):
    out = run_cli("validate", str(REPO / "recipes" / "quickstart.yaml"), "train.steps=2")
    assert out.returncode == 0, out.stderr
    resolved = yaml.safe_load(out.stdout)
    assert resolved["train"]["steps"] == 2
    for key in ("model", "data", "rollout", "algorithm", "reward", "train", "checkpoint", "logging", "seed", "output_dir"):
        assert key in resolved
    assert resolved["train"]["backend"] == "torch" and resolved["rollout"]["engine"] == "hf"


def test_the_training_modules_load_without_the_packages_only_some_runs_need():
    # `datasets` (about 1.3 s to import) reads .json/.parquet files and hub ids; math-verify (0.9 s,
    # sympy) grades MATH answers. Every `llmrl` process paid both at start-up, and a CLI call that
    # needed neither took 8.6-9.0 s instead of 6.2-6.4 (docs/benchmarks.md).
    heavy = ("datasets", "pyarrow", "math_verify", "sympy")
    code = f"import sys, llmrl.cli, llmrl.recipe, llmrl.loop, llmrl.eval.harness; print([m for m in {heavy!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_cli_bad_key_exits_2_without_traceback(tmp_path):
    path = write(tmp_path, "train:\n  stepz: 3\n")
    for command in ("validate", "train"):
        out = run_cli(command, path)
        assert out.returncode == 2
        assert "Traceback" not in out.stderr and "train.stepz" in out.stderr


def test_validate_prints_the_preset_values_that_run():
    """The DAPO preset's clip-higher and dynamic sampling, not the base defaults, and its stages."""
    out = run_cli("validate", str(REPO / "recipes" / "arith_dapo.yaml"))
    assert out.returncode == 0, out.stderr
    algo = yaml.safe_load(out.stdout)["algorithm"]
    assert algo["clip_eps_high"] == 0.28 and algo["dynamic_sampling"] is True and algo["overlong_shaping"] is True
    assert (algo["advantage"], algo["loss"], algo["loss_scale_factor"]) == ("grpo", "ppo_clip", 32)
    assert yaml.safe_load(out.stdout)["rollout"]["workflow"] == {"name": "single_turn"}
    assert "# stages this algorithm runs (llmrl/stages.py): dynamic_sampling" in out.stdout


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_rerun_from_the_saved_recipe_resolves_to_the_same_algorithm(tmp_path, preset):
    """A run's recipe.yaml lists every field; loading it again must not turn preset values into
    base defaults or the reverse (Dr. GRPO's saved recipe once trained plain GRPO)."""
    first = load_recipe(None, [f"algorithm.name={preset}", "rollout.max_new_tokens=48"])
    saved = tmp_path / "recipe.yaml"
    saved.write_text(dump_recipe(first))
    again = load_recipe(str(saved))
    assert again.algorithm == first.algorithm
    assert again.algorithm == resolve_recipe(again).algorithm  # resolving twice changes nothing
    assert again.rollout.workflow == first.rollout.workflow
    preset_obj = PRESETS[preset]
    for key, value in preset_obj.defaults.items():
        assert getattr(again.algorithm, key) == value, key
    assert (again.algorithm.advantage, again.algorithm.loss) == (preset_obj.advantage, preset_obj.loss)


def test_registered_names_are_checked_against_the_registries():
    for override, message in (
        ("rollout.engine=vlm", "did you mean 'vllm'"),
        ("train.backend=deepspeeed", "did you mean 'deepspeed'"),
        ("algorithm.kl_estimator=k4", "unknown KL estimator 'k4'"),
        ("algorithm.loss_agg_mode=token_mean", "did you mean 'token-mean'"),
        ("rollout.workflow.name=multi", "unknown workflow 'multi'"),
        ("rollout.workflow.turns=3", "turns"),
        ("rollout.weight_sync=broadcst", "unknown weight sync 'broadcst' (known: broadcast, inprocess); did you mean 'broadcast'?"),
        ("rollout.weight_sync=broadcast", "'broadcast' needs cluster.backend: ray"),
        ("cluster.backend=slurm", "unknown cluster backend 'slurm' (known: none, ray)"),
    ):
        with pytest.raises(RecipeError, match=re.escape(message)):
            load_recipe(None, [override, "rollout.workflow.name=single_turn"] if "turns" in override else [override])


# ---------------------------------------------------------------- overrides name themselves; strict YAML


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.steps=abc", r"^train\.steps: .*integer.*'abc'.* in override 'train\.steps=abc'$"),
        ("train.stepz=3", r"^unknown key 'train\.stepz' in override 'train\.stepz=3' \(did you mean 'train\.steps'\?\)$"),
        ("rolout.n=2", r"^unknown key 'rolout' in override 'rolout\.n=2' \(did you mean 'rollout'\?\)$"),
        ("train.steps=[1,", r"^override 'train\.steps=\[1,': cannot parse the value '\[1,'"),
        ("train={steps: abc}", r"^train\.steps: .* in override 'train=\{steps: abc\}'$"),
        ("train.micro_batch_size=3", r"must divide .* in override 'train\.micro_batch_size=3' \(over .*r\.yaml\)$"),
    ],
)
def test_override_mistakes_name_the_override_not_the_file(tmp_path, override, expected):
    path = write(tmp_path, "train:\n  steps: 2\n  prompts_per_step: 8\n")
    with pytest.raises(RecipeError) as err:
        load_recipe(path, [override])
    assert re.search(expected, str(err.value)), str(err.value)


def test_a_bad_value_in_the_file_still_names_the_file_beside_good_overrides(tmp_path):
    path = write(tmp_path, "train:\n  lr: fast\n")
    with pytest.raises(RecipeError, match=r"train\.lr: .*'fast'.* in .*r\.yaml$"):
        load_recipe(path, ["train.steps=3", "model.name=tiny"])


def test_cli_override_mistake_exits_2_naming_the_override(tmp_path):
    out = run_cli("validate", str(REPO / "recipes" / "quickstart.yaml"), "train.steps=abc")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "override 'train.steps=abc'" in out.stderr and "quickstart.yaml" not in out.stderr


def test_duplicate_key_in_recipe_is_refused_with_key_and_line(tmp_path):
    path = write(tmp_path, "train:\n  steps: 2\n  lr: 1.0e-5\n  steps: 3\n")
    with pytest.raises(RecipeError, match=r"r\.yaml: duplicate key 'steps' on line 4 \(first on line 2\)"):
        load_recipe(path)
    path = write(tmp_path, "train:\n  steps: 2\ntrain:\n  lr: 1.0e-5\n", name="twice.yaml")
    with pytest.raises(RecipeError, match=r"twice\.yaml: duplicate key 'train' on line 3 \(first on line 1\)"):
        load_recipe(path)
    out = run_cli("validate", path)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "duplicate key 'train'" in out.stderr


def test_duplicate_key_in_an_override_value_is_refused():
    with pytest.raises(RecipeError, match=r"override 'train=\{steps: 1, steps: 2\}'.*duplicate key 'steps'"):
        load_recipe(None, ["train={steps: 1, steps: 2}"])


def test_section_override_merges_into_the_section(tmp_path):
    path = write(tmp_path, "train:\n  steps: 2\n  lr: 3.0e-5\n  betas: [0.8, 0.9]\nrollout:\n  n: 4\n  temperature: 0.7\n")
    recipe = load_recipe(path, ["train={steps: 5, betas: [0.5, 0.6]}", "rollout={n: 2}"])
    # the keys named are replaced (a list whole), the section's other keys kept from the file
    assert recipe.train.steps == 5 and recipe.train.lr == 3.0e-5 and recipe.train.betas == (0.5, 0.6)
    assert recipe.rollout.n == 2 and recipe.rollout.temperature == 0.7
    # nested sections merge too, and a later override of the same key wins
    recipe = load_recipe(None, ["eval={benches: [arithmetic], limit: 5}", "eval={limit: 7}", "eval.n=1"])
    assert recipe.eval.benches == ["arithmetic"] and recipe.eval.limit == 7


def test_cli_without_a_recipe_says_the_recipe_is_missing():
    for command in ("train", "validate"):
        out = run_cli(command)
        assert out.returncode == 2
        assert out.stderr.strip().endswith("the following arguments are required: recipe"), out.stderr
        assert "overrides" not in out.stderr.splitlines()[-1]


def test_recipe_file_that_is_not_utf8_or_a_directory_is_a_clear_error(tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"train:\n  steps: 2\n# caf\xe9\n")
    with pytest.raises(RecipeError, match=r"latin1\.yaml: not UTF-8 text \(byte 0xe9 at offset 23\)"):
        load_recipe(str(bad))
    with pytest.raises(RecipeError, match=r"cannot read the recipe: Is a directory"):
        load_recipe(str(tmp_path))
