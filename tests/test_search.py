"""`weightmix search`: Optuna searches over recipe values on tiny SD1.5-layout models (every
12th key, so every block is there): recovering a target merge's block weights, the same trials
locally and on a local Ray instance, resuming an interrupted search, failed trials recorded,
and bad input refused in one line before anything is merged."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from fuzzing import sd1_spread_state
from helpers import load, save

import weightmix
from weightmix.errors import WeightmixError
from weightmix.search.run import ERROR_ATTR, search
from weightmix.search.spec import load_search

TARGET_ALPHA = {"IN": 0.2, "OUT": 0.8, "default": 0.5}


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """Models A and B, and T = A and B blended by TARGET_ALPHA per block group."""
    for name, seed in (("A", 1), ("B", 2)):
        save(tmp_path / f"{name}.safetensors", sd1_spread_state(seed))
    recipe = {
        "models": {"A": "A.safetensors", "B": "B.safetensors"},
        "merge": {"method": "weighted_sum", "inputs": ["A", "B"], "alpha": TARGET_ALPHA},
    }
    weightmix.merge(weightmix.api.parse_recipe(recipe, base_dir=tmp_path),
                    tmp_path / "T.safetensors")  # fmt: skip
    return tmp_path


def write_search(folder: Path, name: str = "search.yaml", **settings) -> Path:
    """A search for alpha per block group against T (distance), with `settings` over the
    defaults; `merge` / `objective` replace the merge or the objective."""
    merge = settings.pop("merge", None) or {
        "method": "weighted_sum",
        "inputs": ["A", "B"],
        "alpha": {"search": [0, 1], "step": 0.05, "per": ["IN", "OUT", "default"]},
    }
    section = {"objective": {"distance": "T.safetensors"}, "trials": 8, "seed": 3} | settings
    data = {"models": {"A": "A.safetensors", "B": "B.safetensors"}, "merge": merge,
            "search": section}  # fmt: skip
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def study_of(path: Path, **flags):
    """Run the search in `path` (no output); its Optuna study."""
    return search(load_search(path), echo=lambda _: None, **flags).study


def test_a_search_recovers_the_block_weights_of_a_target_merge(folder):
    """40 TPE trials on a 0.05 grid find each group's weight within 0.1, and the best
    recipe file reproduces the best trial's merge."""
    path = write_search(folder, trials=40, sampler="tpe", seed=0)
    study = study_of(path)
    best = study.best_trial.params
    for group, expected in TARGET_ALPHA.items():
        assert abs(best[f"merge.alpha.{group}"] - expected) <= 0.1, (group, best)
    assert len(study.trials) == 40
    from weightmix.search import report

    paths = report.outputs(load_search(path))
    assert report.write_best_recipe(load_search(path), study, paths["recipe"])
    written = yaml.safe_load(paths["recipe"].read_text())
    assert written["merge"]["alpha"] == {g: best[f"merge.alpha.{g}"] for g in TARGET_ALPHA}
    merged = weightmix.api.merge_to_state_dict(paths["recipe"])
    target = load(folder / "T.safetensors")
    distance = sum(float(((merged[k].double() - target[k].double()) ** 2).sum())
                   for k in target if target[k].is_floating_point()) ** 0.5  # fmt: skip
    assert distance == pytest.approx(study.best_value, rel=1e-9)


def test_the_cli_writes_the_best_recipe_and_plots_and_show_repeats_them(run, folder):
    path = write_search(folder, trials=4)
    result = run("search", path)
    assert result.code == 0, result.err
    assert "4 trials: 4 scored, 0 failed" in result.out
    for suffix in (".best.yaml", ".trials.png", ".importance.png"):
        assert (folder / f"search{suffix}").stat().st_size > 0
    assert (folder / "search.trials.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    again = run("search", path)
    assert again.code == 2 and "--resume continues it" in again.err
    shown = run("search", path, "--show")
    assert shown.code == 0 and "4 trials: 4 scored" in shown.out


def test_resume_after_an_interrupted_search_continues_the_trial_count(folder, monkeypatch):
    from weightmix.search import run as runner

    path = write_search(folder, trials=6)
    original, calls = runner.run_trial, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(runner, "run_trial", interrupted)
    with pytest.raises(KeyboardInterrupt):
        study_of(path)
    monkeypatch.setattr(runner, "run_trial", original)
    stored = study_of(path, resume=True)
    states = [t.state.name for t in stored.trials]
    assert len(states) == 6 and [t.number for t in stored.trials] == list(range(6))
    assert states[:3] == ["COMPLETE", "COMPLETE", "FAIL"] and states[3:] == ["COMPLETE"] * 3
    assert stored.trials[2].user_attrs[ERROR_ATTR] == "interrupted"


def test_a_trial_that_raises_is_recorded_and_the_search_goes_on(folder, monkeypatch):
    a, b = load(folder / "A.safetensors"), load(folder / "B.safetensors")
    key = next(
        k for k in sorted(a) if a[k].is_floating_point() and a[k].flatten()[0] != b[k].flatten()[0]
    )
    low, high = sorted((float(a[key].flatten()[0]), float(b[key].flatten()[0])))
    (folder / "scores.py").write_text(  # fails for alpha past the middle, on either side
        "def score(state):\n"
        f"    value = float(state[{key!r}].flatten()[0])\n"
        f"    if value > {(low + high) / 2!r}:\n"
        "        raise ValueError('too bright')\n"
        "    return value\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    merge = {"method": "weighted_sum", "inputs": ["A", "B"], "alpha": {"search": [0, 1]}}
    path = write_search(folder, trials=8, merge=merge, objective={"callable": "scores:score"})
    study = study_of(path)
    failed = [t for t in study.trials if t.state.name == "FAIL"]
    scored = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(study.trials) == 8 and failed and scored
    assert all(t.user_attrs[ERROR_ATTR] == "ValueError: too bright" for t in failed)


def test_an_objective_that_cannot_be_imported_stops_after_the_first_trials(run, folder):
    merge = {"method": "weighted_sum", "inputs": ["A", "B"], "alpha": {"search": [0, 1]}}
    path = write_search(folder, trials=20, merge=merge, objective={"callable": "nowhere:score"})
    result = run("search", path)
    assert result.code == 2
    assert result.err.startswith("weightmix: error: the first 5 trials all failed; the first:")
    assert "cannot import nowhere" in result.err and len(result.err.splitlines()) == 1


def test_an_objective_returning_no_number_fails_its_trials(folder, monkeypatch):
    (folder / "words.py").write_text("def score(state):\n    return 'good'\n")
    monkeypatch.syspath_prepend(str(folder))
    merge = {"method": "weighted_sum", "inputs": ["A", "B"], "alpha": {"search": [0, 1]}}
    path = write_search(folder, trials=5, merge=merge, objective={"callable": "words:score"})
    with pytest.raises(WeightmixError, match="returned str, not a number"):
        study_of(path)


@pytest.mark.parametrize(
    ("variable", "says"),
    [
        ({"search": [1, 0]}, "is empty or reversed"),
        ({"search": [0.5, 0.5]}, "is empty or reversed"),
        ({"search": [0, "x"]}, "two finite numbers"),
        ({"search": [10**400, 1]}, "two finite numbers"),  # fuzzing: OverflowError before
        ({"search": [0, 1], "step": 10**400}, "step must be a number"),
        ({"choice": []}, "non-empty list"),
        ({"search": [0, 1], "per": "blocks"}, "per is 'block' or a list"),
        ({"search": [0, 1], "bogus": 1}, "unknown ['bogus']"),
    ],
)
def test_bad_search_variables_are_one_line(run, folder, variable, says):
    merge = {"method": "weighted_sum", "inputs": ["A", "B"], "alpha": variable}
    result = run("search", write_search(folder, merge=merge))
    assert result.code == 2 and says in result.err and len(result.err.splitlines()) == 1


def test_a_variable_on_a_parameter_the_method_lacks_is_refused_before_merging(run, folder):
    merge = {"method": "weighted_sum", "inputs": ["A", "B"], "alpha": 0.5,
             "density": {"search": [0.1, 0.9]}}  # fmt: skip
    result = run("search", write_search(folder, merge=merge))
    assert result.code == 2 and "density" in result.err and len(result.err.splitlines()) == 1
    assert not (folder / "search.db").exists()  # refused before the study was made


def test_an_unreachable_ray_address_is_one_line_before_any_merge(run, folder):
    result = run("search", write_search(folder), "--ray", "127.0.0.1:1")
    assert result.code == 2 and "--ray 127.0.0.1:1: cannot connect" in result.err
    assert not (folder / "search.best.yaml").exists()


def test_per_block_gives_one_variable_per_block_of_the_architecture(folder):
    merge = {"method": "weighted_sum", "inputs": ["A", "B"],
             "alpha": {"search": [0, 1], "per": "block"}}  # fmt: skip
    study = study_of(write_search(folder, trials=2, merge=merge))
    names = list(study.trials[0].params)
    assert len(names) == 26 and names[0] == "merge.alpha.BASE" and names[-1] == "merge.alpha.OUT11"


def test_choices_may_be_block_values(folder):
    merge = {"method": "weighted_sum", "inputs": ["A", "B"],
             "alpha": {"choice": [[0.1] * 26, "GRAD_V", {"IN": 0.2, "default": 0.9}]}}  # fmt: skip
    study = study_of(write_search(folder, trials=6, merge=merge, sampler="random"))
    seen = {t.params["merge.alpha"] for t in study.trials}  # searched by index
    assert seen <= {0, 1, 2} and len(seen) >= 2 and all(t.value is not None for t in study.trials)


def test_the_same_search_on_local_processes_and_on_ray_finds_the_same_best_trial(
    folder, monkeypatch
):
    """Local worker processes and Ray tasks (a local instance with 2 CPUs) run the same trials
    for the same seed and sampler; with ship_inputs the Ray workers read the models and the
    target from the copies sent through the object store (the originals moved away)."""
    import ray

    from weightmix.search import run as runner

    local = study_of(write_search(folder, "local.yaml", trials=6, workers=2))
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    original = runner.ship_inputs

    def ship_then_move(*args):
        shipped = original(*args)
        for name in ("A", "B", "T"):
            (folder / f"{name}.safetensors").rename(folder / f"{name}.moved")
        return shipped

    try:
        remote = study_of(write_search(folder, "ray.yaml", trials=6, workers=2), ray=ray)
        monkeypatch.setattr(runner, "ship_inputs", ship_then_move)
        path = write_search(folder, "shipped.yaml", trials=6, workers=2, ship_inputs=True)
        shipped = study_of(path, ray=ray)
    finally:
        ray.shutdown()
    assert [t.params for t in remote.trials] == [t.params for t in local.trials]
    assert remote.best_trial.number == local.best_trial.number
    assert remote.best_value == local.best_value
    assert not (folder / "A.safetensors").exists()  # the shipped run read copies
    assert [t.value for t in shipped.trials] == [t.value for t in local.trials], [
        t.user_attrs for t in shipped.trials
    ]


def test_ship_inputs_without_ray_is_refused(run, folder):
    result = run("search", write_search(folder, ship_inputs=True))
    assert result.code == 2 and "ship_inputs needs --ray" in result.err


def test_a_range_past_what_the_parameter_takes_is_refused_before_merging(run, folder):
    merge = {"method": "weighted_sum", "inputs": ["A", "B"], "alpha": {"search": [0, 1.5]}}
    result = run("search", write_search(folder, merge=merge))
    assert result.code == 2 and "merge.alpha=1.5" in result.err
    assert len(result.err.splitlines()) == 1 and not (folder / "search.db").exists()


def test_the_example_search_runs_on_tiny_models(tmp_path):
    example = Path(__file__).parent.parent / "examples" / "search-block-weights.yaml"
    data = yaml.safe_load(example.read_text())
    for seed, name in enumerate(data["models"]):
        data["models"][name] = str(save(tmp_path / f"{name}.safetensors", sd1_spread_state(seed)))
    data["search"]["trials"] = 3
    path = tmp_path / "example.yaml"
    path.write_text(yaml.safe_dump(data))
    study = study_of(path)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    assert -2 <= study.best_value <= 0  # balance: minus a mean spread of cosines


@pytest.fixture(scope="module")
def loadable_pipelines(tmp_path_factory):
    """test_preview's two tiny runnable Stable Diffusion pipelines."""
    from test_preview import loadable_pipelines as build

    return build.__wrapped__(tmp_path_factory)


def test_an_images_objective_scores_what_the_merged_pipeline_draws(
    tmp_path, monkeypatch, loadable_pipelines
):
    """Each trial's score is the scorer's number for the images the merge draws: checked by
    drawing a trial's image again in a freshly loaded pipeline."""
    import numpy as np

    from weightmix.analysis.preview import generate, load_merged, load_pipeline

    (tmp_path / "brightness.py").write_text(
        "import numpy as np\n"
        "def score(images):\n"
        "    return float(np.mean([np.asarray(i, dtype=np.float64).mean() for i in images]))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    images = {"score": "brightness:score", "prompts": ["a cat", "a dog"], "steps": 5, "size": 16}
    data = {
        "models": {"A": str(loadable_pipelines[0]), "B": str(loadable_pipelines[1])},
        "merge": {"method": "weighted_sum", "inputs": ["A", "B"], "alpha": {"search": [0, 1]}},
        "search": {"objective": {"images": images}, "trials": 3, "seed": 1},
    }
    path = tmp_path / "images.yaml"
    path.write_text(yaml.safe_dump(data))
    study = study_of(path)
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3, study.trials[0].user_attrs
    assert len({t.value for t in study.trials}) == 3  # the blend changes the images
    trial = study.trials[1]
    recipe = dict(data, merge=data["merge"] | {"alpha": trial.params["merge.alpha"]})
    del recipe["search"]
    pipeline = load_pipeline(loadable_pipelines[0], "cpu")
    load_merged(pipeline, weightmix.api.merge_to_state_dict(recipe))
    folder, steps, size = loadable_pipelines[0], images["steps"], images["size"]
    drawn = [generate(pipeline, folder, p, 0, steps, size, "cpu") for p in images["prompts"]]
    expected = float(np.mean([np.asarray(i, dtype=np.float64).mean() for i in drawn]))
    assert trial.value == expected
    from weightmix.search.run import memory_per_trial

    weights = sum(f.stat().st_size for f in loadable_pipelines[0].rglob("*.safetensors"))
    assert weights > 0 and memory_per_trial(load_search(path), 1) > 2 * weights + (300 << 20)


def callable_search(folder, name, body, trials=4, **settings):
    """A search of alpha with the objective `name`:score defined by `body` in a module
    beside the search file (found without touching sys.path: the search adds the folder)."""
    (folder / f"{name}.py").write_text(body)
    merge = {"method": "weighted_sum", "inputs": ["A", "B"], "alpha": {"search": [0, 1]}}
    return write_search(folder, f"{name}.yaml", trials=trials, merge=merge,
                        objective={"callable": f"{name}:score"}, **settings)  # fmt: skip


def test_a_worker_that_dies_fails_its_trial_and_the_search_goes_on(folder):
    path = callable_search(folder, "dies_sometimes", (
        "import os, signal\n"
        "def score(state):\n"
        "    value = float(sum(float(t.float().sum()) for t in state.values()))\n"
        "    if int(abs(value) * 1000) % 2:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "    return value\n"
    ), trials=6, workers=2)  # fmt: skip
    study = study_of(path)
    states = [t.state.name for t in study.trials]
    assert len(states) == 6 and "FAIL" in states and "COMPLETE" in states
    for trial in study.trials:
        if trial.state.name == "FAIL":
            assert trial.user_attrs[ERROR_ATTR].startswith("the worker running it died")


def test_an_objective_calling_sys_exit_fails_its_trial(folder):
    path = callable_search(folder, "exits", "import sys\ndef score(state):\n    sys.exit(3)\n")
    with pytest.raises(WeightmixError, match=r"no trial of 4 scored; the first: the objective"
                       r" called sys.exit\(3\)"):  # fmt: skip
        study_of(path)


def test_a_search_in_which_no_trial_scores_is_an_error(run, folder):
    path = callable_search(folder, "never", "def score(state):\n    raise ValueError('no')\n",
                           trials=3)  # fmt: skip
    result = run("search", path)
    assert result.code == 2 and "no trial of 3 scored; the first: ValueError: no" in result.err


def test_nan_from_a_built_in_objective_fails_the_trial(folder):
    a = load(folder / "A.safetensors")
    key = next(k for k in a if a[k].is_floating_point())
    a[key].view(-1)[0] = float("nan")
    save(folder / "A.safetensors", a)
    path = write_search(folder, trials=2)
    data = yaml.safe_load(path.read_text())
    data["allow_nonfinite"] = True
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(WeightmixError, match="objective distance returned nan"):
        study_of(path)


def test_resuming_a_search_whose_variables_changed_is_refused(run, folder):
    path = write_search(folder, trials=2)
    assert run("search", path).code == 0
    data = yaml.safe_load(path.read_text())
    data["merge"]["alpha"]["per"] = ["IN", "M00", "OUT", "default"]
    path.write_text(yaml.safe_dump(data))
    for flag in ("--resume", "--show"):
        result = run("search", path, flag)
        assert result.code == 2 and "searched other variables" in result.err, flag


def test_show_before_any_run_and_odd_values_are_one_line(run, folder):
    path = write_search(folder)
    result = run("search", path, "--show")
    assert result.code == 2 and "run it first" in result.err
    assert not (folder / "search.db").exists()
    merge = {"method": "weighted_sum", "inputs": ["A", "B"],
             "alpha": {"search": [0, 1], "step": 0.3}}  # fmt: skip
    result = run("search", write_search(folder, merge=merge))
    assert result.code == 2 and "does not divide" in result.err
    dated = folder / "dated.yaml"
    dated.write_text(
        "models: {A: A.safetensors, B: B.safetensors}\n"
        "merge: {method: weighted_sum, inputs: [A, B], alpha: {choice: [0.5, 2019-01-01]}}\n"
        "search: {objective: {distance: T.safetensors}, trials: 2}\n"
    )
    result = run("search", dated)
    assert result.code == 2 and len(result.err.splitlines()) == 1, result.err


def test_a_variable_repeated_by_a_yaml_alias_is_searched_in_each_place(folder):
    path = folder / "alias.yaml"
    path.write_text(
        "models: {A: A.safetensors, B: B.safetensors}\n"
        "merge:\n"
        "  method: weighted_sum\n"
        "  alpha: 0.5\n"
        "  inputs:\n"
        "    - &inner {method: weighted_sum, inputs: [A, B], alpha: {search: [0, 1]}}\n"
        "    - *inner\n"
        "search: {objective: {distance: T.safetensors}, trials: 2, seed: 0}\n"
    )
    spec = load_search(path)
    assert [v.name for v in spec.variables] == ["merge.inputs[0].alpha", "merge.inputs[1].alpha"]
    data = spec.trial_data({"merge.inputs[0].alpha": 0.25, "merge.inputs[1].alpha": 0.75})
    assert [node["alpha"] for node in data["merge"]["inputs"]] == [0.25, 0.75]


def test_no_ray_node_big_enough_is_refused():
    from weightmix.search.run import check_ray_resources

    class Cluster:
        @staticmethod
        def nodes():
            return [{"Alive": True, "Resources": {"CPU": 2.0, "memory": 8e9}}]

    check_ray_resources(Cluster, 2, 0, 1 << 30)
    with pytest.raises(WeightmixError, match="no node of the Ray cluster"):
        check_ray_resources(Cluster, 4, 0, 1 << 30)
    with pytest.raises(WeightmixError, match="1 GPU"):
        check_ray_resources(Cluster, 1, 1, 1 << 30)


def test_the_method_itself_can_be_a_choice(folder):
    """Categorical choice of the method: weighted_sum or add_cosine_a, both with alpha."""
    merge = {"method": {"choice": ["weighted_sum", "add_cosine_a"]}, "inputs": ["A", "B"],
             "alpha": {"search": [0, 1], "step": 0.5}}  # fmt: skip
    study = study_of(write_search(folder, trials=6, merge=merge, sampler="random", seed=2))
    methods = {t.params["merge.method"] for t in study.trials}
    assert methods == {"weighted_sum", "add_cosine_a"}
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    best = study.best_trial.params
    assert best["merge.method"] == "weighted_sum"  # T is a weighted sum of A and B
