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
    assert [line.split("|")[1].strip() for line in table.splitlines() if line.startswith("| ")][1:] == [
        "base",
        *methods,
    ]
    assert (tmp_path / "results.png").is_file()
    for method in methods:
        run = tmp_path / f"{method}-seed0"
        base, _ = pretrained_tiny_janus()
        PeftModel.from_pretrained(base, run)
        Perturber.from_pretrained(run / "perturber")
        assert 0 <= json.loads((run / "results.json").read_text())["after/clean/vqa_accuracy"] <= 1
    # Only the game differs: the plain run never played, the game's runs did.
    assert report["config"]["methods"]["sft"]["mining_interval"] == 0


def test_effect_methods_differ_only_in_the_game():
    import effect

    from trl_unigame.unigame_config import UniGameArguments

    game_fields = {f for f in UniGameArguments.__dataclass_fields__}
    for method, settings in effect.METHODS.items():
        assert set(settings) <= game_fields, method  # nothing outside the game's own fields
    assert not set(effect.COMMON) & set().union(*effect.METHODS.values())
