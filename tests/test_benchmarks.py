import json
import os
import sys

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


@pytest.mark.slow
def test_effect_benchmark_quick_mode_trains_every_method_on_the_same_rows(tmp_path):
    import effect
    from peft import PeftModel

    from trl_unigame import Perturber
    from trl_unigame.testing import pretrained_tiny_janus

    methods = ["sft", "unigame", "embedding"]
    report = effect.main(["--output_dir", str(tmp_path), "--quick", "--methods", *methods])
    assert report["same_rows_in_same_order"] and report["config"]["args"]["max_steps"] == 6
    assert set(report["runs"]) == {"base", *methods} and all(len(report["runs"][m]) == 1 for m in methods)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["summary"].keys() == report["summary"].keys() and saved["git_revision"]
    table = (tmp_path / "results.md").read_text()
    accuracy, paired_table = table.split("Difference to `sft` seed by seed")
    assert [line.split("|")[1].strip() for line in paired_table.splitlines() if line.startswith("| ")][1:] == [
        "unigame",
        "embedding",
    ]
    assert [line.split("|")[1].strip() for line in accuracy.splitlines() if line.startswith("| ")][1:] == [
        "base",
        *methods,
    ]
    assert (tmp_path / "results.png").is_file()
    # Both directions of consistency are measured on every trained model.
    assert all(0 <= report["runs"][m][0]["after/reverse_consistency/similarity"] <= 1 for m in methods)
    # Paired differences to sft, seed by seed, for every other method and metric.
    assert set(report["paired_to_sft"]) == {"unigame", "embedding"} and report["recommended"] in effect.METHODS
    for method in ("unigame", "embedding"):
        for key, paired in report["paired_to_sft"][method].items():
            assert paired["by_seed"]["0"] == pytest.approx(
                report["runs"][method][0][key] - report["runs"]["sft"][0][key], nan_ok=True
            )
            assert paired["seeds_above_zero"] == int(paired["mean"] > 0)
    # The report rebuilt from the runs on disk, training nothing, is the same report.
    again = effect.main(["--output_dir", str(tmp_path), "--quick", "--methods", *methods, "--no_base", "--summarize"])
    assert again["same_rows_in_same_order"] is True and "base" not in again["runs"]
    for method, paired in report["paired_to_sft"].items():
        for key, values in paired.items():
            assert again["paired_to_sft"][method][key]["mean"] == pytest.approx(values["mean"], nan_ok=True)
    for method in methods:
        run = tmp_path / f"{method}-seed0"
        base, _ = pretrained_tiny_janus()
        PeftModel.from_pretrained(base, run)
        Perturber.from_pretrained(run / "perturber")
        assert 0 <= json.loads((run / "results.json").read_text())["after/clean/vqa_accuracy"] <= 1
    # Only the game differs: the plain run never played, the game's runs did.
    assert report["config"]["methods"]["sft"]["mining_interval"] == 0


@pytest.mark.slow
def test_effect_benchmark_in_the_canvas_world_measures_the_broad_setting_costs_and_baselines(tmp_path):
    import effect

    methods = ["sft", "self-augment", effect.RECOMMENDED]
    argv = ["--world", "canvas", "--output_dir", str(tmp_path), "--quick", "--no_base", "--methods", *methods]
    report = effect.main(argv + ["--eval_colors", "one", "--eval_scans", "16"])
    assert report["config"]["world"] == "canvas" and report["same_rows_in_same_order"]
    for method in methods:
        run = report["runs"][method][0]
        assert {"after_broad/clean/vqa_accuracy", "digit_broad/vqa_accuracy", "after/clean/vqa_accuracy"} <= set(run)
        assert "after_shift2/vqa_accuracy" not in run  # the frame world's shift is not this world's
    # fine-tuning saw only the narrow setting: full-frame digits
    train, datasets = effect.world_datasets("canvas", "test", dict(max_scans=8, every_color=False))
    assert set(train["digit_size"]) == {16} and min(datasets["broad"]["digit_size"]) < 16
    versus = report["recommended_vs_baselines"]["self-augment"][effect.RECOMMENDED]
    key = "after_broad/clean/vqa_accuracy"
    expected = report["runs"][effect.RECOMMENDED][0][key] - report["runs"]["self-augment"][0][key]
    assert versus[key]["by_seed"]["0"] == pytest.approx(expected)
    costs = report["step_cost_to_sft"]
    assert costs["sft"]["median"] == 1.0 and costs["self-augment"]["median"] > 1.0
    table = (tmp_path / "results.md").read_text()
    assert "broad (8-12 px)" in table and f"`{effect.RECOMMENDED}` minus `self-augment`" in table


def test_effect_methods_differ_only_in_the_game():
    import effect

    from trl_unigame.unigame_config import UniGameArguments

    game_fields = {f for f in UniGameArguments.__dataclass_fields__}
    for method, settings in effect.METHODS.items():
        assert set(settings) <= game_fields, method  # nothing outside the game's own fields
    for method, settings in effect.METHODS.items():
        # no method overrides a shared setting, except the generation loss's weight that goes with its anchors
        overridden = set(effect.COMMON) & set(settings)
        assert overridden <= ({"generation_loss_weight"} if "generation_loss_targets" in settings else set()), method


@pytest.mark.slow
def test_first_order_fidelity_measures_the_trainers_own_step(tmp_path):
    import first_order_fidelity

    out = tmp_path / "fidelity.json"
    first_order_fidelity.main(
        ["--max_steps", "2", "--probe_every", "1", "--output_dir", str(tmp_path), "--output_json", str(out)]
    )
    report = json.loads(out.read_text())
    first, exact = report["probes"]["first_order"], report["probes"]["exact"]
    assert [p["step"] for p in first] == [p["step"] for p in exact] == [0, 1]
    # In the exact run the probe recomputes the trainer's own exact step: the same gradient, which checks the probe.
    assert all(p["cosine"] == pytest.approx(1.0, abs=1e-5) and p["estimated_gap"] is None for p in exact)
    # Step 0: the same perturber, batch and model in both runs, so the same losses; the first-order step's gradient
    # is a close approximation of the exact one, not a copy of it.
    for key in ("clean_loss", "adversarial_loss"):
        assert first[0][key] == pytest.approx(exact[0][key], rel=1e-5)
    assert 0.9 < first[0]["cosine"] < 1.0 - 1e-6
    assert first[0]["estimated_gap"] is not None and first[0]["adversarial_loss"] != first[0]["clean_loss"]


@pytest.mark.slow
def test_adversary_strength_quick_mode_writes_every_mode_and_budget(tmp_path):
    import adversary_strength

    out = tmp_path / "adversary.json"
    adversary_strength.main(["--quick", "--output_dir", str(tmp_path), "--output_json", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved["modes"]) == {"features", "features_and_gradient"}
    for rows in saved["modes"].values():
        assert set(rows) == {"0.05"}
        assert set(rows["0.05"]) == {"clean", "perturber", "fgsm", "pgd", "strength"}
        assert all(0 <= rows["0.05"][k] <= 100 for k in ("clean", "perturber", "fgsm", "pgd"))


@pytest.mark.slow
def test_gpu_check_smoke_mode_runs_every_stage_and_writes_its_report(tmp_path):
    import subprocess

    out = subprocess.run(
        ["bash", os.path.join(ROOT, "scripts", "gpu_check.sh"), str(tmp_path), "--smoke"],
        capture_output=True, text=True, timeout=400, env={**os.environ, "PYTHON": sys.executable},
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["preflight"]["missing"] == [] and result["smoke"]
    assert {name: stage["status"] for name, stage in result["stages"].items()} == {
        "main_job": "ok",
        "steps": "ok",
        "reinforce": "ok",
        "mining": "ok",
    }, result["stages"]
    variants = result["step_overhead"]["variants"]
    assert set(variants) == {"plain", "game_no_mining_first_order_gradient", "game_generation_adversary"}
    assert all(v["step_s"] > 0 and v["peak_bytes"] > 0 for v in variants.values())
    mining = result["step_overhead"]["mining"]
    assert {"generate_images", "generate_images_compiled", "generate_images_8px", "transformers_generate"} <= set(
        mining
    )
    table = (tmp_path / "gpu_check.md").read_text()
    assert "| game_no_mining_first_order_gradient |" in table and "<= 1.3" in table and ">= 1.3" in table
    assert result["main_job_table"] and result["main_job_table"] in table
    assert len(os.listdir(tmp_path)) <= 8  # what a device machine sends back
