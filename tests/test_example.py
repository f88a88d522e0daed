import os
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from peft import PeftModel

from trl_unigame import Perturber, get_interface
from trl_unigame.data import to_vqa_format
from trl_unigame.testing import draw_shape, tiny_janus


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))
from train_janus import main, make_parser, offline_default_arguments  # noqa: E402


def run_example(output_dir, *extra):
    argv = offline_default_arguments(str(output_dir)) + ["--disable_tqdm", "true", "--compare_scans", "0", *extra]
    return main(*make_parser().parse_args_and_config(args=argv))


def env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}


def digits_inputs(interface, n=3):
    from trl_unigame.testing import digits_vqa_dataset

    rows = digits_vqa_dataset("test", skills=("after",), max_scans=n)
    return interface.build_understanding_inputs(rows["image"], rows["question"], rows["answer"])


def table_rows(printed: str) -> dict[str, list[float]]:
    """The before/after table the offline default prints: each row's label and its percentages."""
    return {
        line.split("|")[1].strip(): [float(cell.strip().rstrip("%")) for cell in line.split("|")[2:-1]]
        for line in printed.splitlines()
        if line.startswith("| ") and line.rstrip().endswith("% |")
    }


def usage_snippet(card: str) -> str:
    """The Python code block of a model card (its usage section)."""
    import re

    return re.search(r"```python\n(.*?)```", card, flags=re.DOTALL).group(1)


def test_offline_default_saves_what_loads_back(tmp_path, capsys):
    from trl_unigame.testing import pretrained_tiny_janus

    trainer = run_example(
        tmp_path / "run", "--max_steps", "6", "--picture_steps", "3", "--save_steps", "3", "--logging_steps", "1"
    )
    out = tmp_path / "run"
    # The console shows one short line per log (disable_tqdm: the printer); the trainer's logs keep every key.
    printed = capsys.readouterr().out
    for step in range(1, 7):
        assert f"step {step}/6 | loss " in printed
    assert "| clean loss " in printed and "| buffer " in printed and "| kept " in printed and "| eps " in printed
    assert "unigame/" not in printed and "grad_norm" not in printed
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert len(logs) == 6
    # (the first-order step measures the perturbation where mining draws: the generation site)
    keys = {"grad_norm", "unigame/eps", "unigame/clean_loss", "unigame/buffer_size", "unigame/generation_token_norm"}
    assert all(keys <= set(log) for log in logs)
    files = set(os.listdir(out))
    assert {
        "adapter_model.safetensors",
        "adapter_config.json",
        "perturber",
        "processor_config.json",
        "README.md",
    } <= files
    assert {"curves.png", "hard_samples_step6.png"} <= set(os.listdir(out / "pictures"))
    card = (out / "README.md").read_text()
    assert "unigame" in card and "arXiv:2511.19413" in card and '"buffer_weight": 0.25' in card
    # The card names what made the run and loads what it names: the shipped base model by the code that loads it,
    # the scorer that filtered the candidates (the digit judge, not the CLIP default).
    assert 'from_pretrained("None")' not in card and "pretrained_tiny_janus()" in card
    assert '"consistency_scorer": "trl_unigame.digit_judge.DigitJudge"' in card and '"consistency_model": null' in card
    assert '"generation_guidance_scale": 3.0' in card and '"generation_temperature": 0.7' in card
    for folder in (out, out / "checkpoint-3", out / "checkpoint-6"):
        card = (folder / "README.md").read_text()
        assert "More Information Needed" not in card and '"buffer_weight": 0.25' in card  # not PEFT's template
        assert f'PeftModel.from_pretrained(base, "{folder}")' in card
        loaded = {}
        exec(usage_snippet(card), loaded)  # the card's own usage code runs
        assert isinstance(loaded["model"], PeftModel) and loaded["perturber"].config.hidden_size == 128
    assert (out / "hard_samples.png").is_file() == bool(trainer.buffer.entries)

    base, processor = pretrained_tiny_janus()
    model = PeftModel.from_pretrained(base, out)
    Perturber.from_pretrained(out, subfolder="perturber").attach(model)
    interface = get_interface(model, processor)
    inputs = digits_inputs(interface, 3)
    trainer.model.eval()
    model.eval()
    with torch.no_grad():
        with trainer.perturber.active():
            expected = trainer.interface.understanding_loss(trainer.model, inputs)
        clean_expected = trainer.interface.understanding_loss(trainer.model, inputs)
        torch.testing.assert_close(interface.understanding_loss(model, inputs), expected)
    assert not torch.allclose(expected, clean_expected)


@pytest.mark.slow
def test_accelerate_launch_with_no_arguments(tmp_path):
    result = subprocess.run(
        ["accelerate", "launch", os.path.join(ROOT, "examples", "train_janus.py")],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Saved the LoRA adapter" in result.stdout
    out = tmp_path / "unigame-janus-tiny"
    assert (out / "perturber" / "model.safetensors").is_file()
    assert (out / "checkpoint-200" / "unigame_buffer_rank0.safetensors").is_file()
    assert (out / "hard_samples.png").is_file()
    # The model learned the new skill and kept the old one: before/after on held-out scans.
    rows = table_rows(result.stdout)
    before, after = rows["next digit: clean"]
    assert before < 10 and after > 60
    before, after = rows["this digit (pretrained): clean"]
    assert after > 80


def test_options_without_a_model_adjust_the_offline_default(tmp_path):
    from train_janus import parse_arguments

    default_script, default_training, default_model = parse_arguments([])
    one = parse_arguments(["--max_steps", "4"])
    two = parse_arguments(["--max_steps", "4", "--learning_rate=2e-3"])
    for _, training_args, model_args in (one, two):
        assert training_args.max_steps == 4
        assert model_args.use_peft and model_args.lora_r == default_model.lora_r == 16
        assert training_args.num_candidates == default_training.num_candidates == 3
        assert training_args.output_dir == default_training.output_dir == "unigame-janus-tiny"
        assert training_args.perturber_budget == default_training.perturber_budget == "relative"
    assert one[1].learning_rate == default_training.learning_rate == 1e-3
    assert two[1].learning_rate == 2e-3
    config = tmp_path / "run.yaml"
    config.write_text("learning_rate: 0.0005\nnum_candidates: 3\n")
    _, from_yaml, yaml_model = parse_arguments(["--config", str(config), "--max_steps", "4"])
    assert (from_yaml.learning_rate, from_yaml.num_candidates, from_yaml.max_steps) == (5e-4, 3, 4)
    assert yaml_model.use_peft  # the default's other settings stay

    # an option that needs a setting the default makes is valid there, and checked against it
    _, anchored, _ = parse_arguments(["--generation_loss_targets", "anchors"])
    assert (anchored.generation_loss_targets, anchored.generation_loss_weight) == ("anchors", 1.0)
    _, fgsm, _ = parse_arguments(["--perturber_inputs", "gradient", "--adversarial_weight", "0"])
    assert fgsm.perturber_inputs == "gradient" and fgsm.perturbed_weight == 0.5
    with pytest.raises(ValueError, match=r"`generation_loss_weight` is 0"):
        parse_arguments(["--generation_loss_targets", "anchors", "--generation_loss_weight", "0"])
    # a model of the user's own starts from its own defaults, without a generation loss
    with pytest.raises(ValueError, match=r"`generation_loss_weight` is 0"):
        parse_arguments(["--model_name_or_path", str(tmp_path / "model"), "--generation_loss_targets", "anchors"])


def test_closing_message_says_what_was_saved(tmp_path, capsys):
    from train_janus import parse_arguments

    common = ["--output_dir", str(tmp_path / "full"), "--max_steps", "2", "--picture_steps", "0"]
    trainer = main(
        *parse_arguments(common + ["--use_peft", "false", "--disable_tqdm", "true", "--compare_scans", "0"])
    )
    printed = capsys.readouterr().out
    assert "Saved the full model" in printed and "LoRA" not in printed
    # the offline default logs a tenth of the run: a short run still logs (every step here)
    assert [log["step"] for log in trainer.state.log_history if "loss" in log] == [1, 2]
    assert (tmp_path / "full" / "model.safetensors").is_file()


def test_console_line_is_short_beside_the_progress_bar_too(tmp_path, capsys):
    trainer = main(
        *make_parser().parse_args_and_config(
            args=offline_default_arguments(str(tmp_path / "run"))
            + ["--disable_tqdm", "false", "--compare_scans", "0", "--max_steps", "2", "--picture_steps", "0"]
        )
    )
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert "step 1/2 | loss " in printed and "step 2/2 | loss " in printed
    assert "unigame/" not in printed and "'grad_norm'" not in printed
    logs = [log for log in trainer.state.log_history if "loss" in log]
    assert logs and all("unigame/generation_realized_delta_norm" in log for log in logs)


def test_load_in_4bit_quantizes_the_shipped_model(tmp_path):
    import bitsandbytes as bnb

    trainer = run_example(tmp_path / "run", "--load_in_4bit", "--max_steps", "2", "--picture_steps", "0")
    base = trainer.model.get_base_model()
    assert base.is_loaded_in_4bit
    quantized = [name for name, module in base.named_modules() if isinstance(module, bnb.nn.Linear4bit)]
    assert any(".language_model." in name for name in quantized) and any("vision_model" in name for name in quantized)
    # the family's small projections, the VQ model and the head stay unquantized (bitsandbytes' CPU kernels)
    assert not any(name.startswith(("model.generation_", "model.vqmodel", "lm_head")) for name in quantized)
    lora_b = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b)  # it trained
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


# Warnings the main job used to print (one of them 21 times); none of them may come back.
KNOWN_WARNINGS = (
    "Both `max_new_tokens`",
    "Passing `generation_config` together with",
    "`is_gradient_checkpointing` is deprecated",
    "'pin_memory' argument is set as true",
    "were not passed to `accelerate launch`",
    "The following generation flags are not valid",
)


def test_main_job_prints_no_repeated_or_known_warning(tmp_path):
    import collections
    import re

    config = os.path.join(ROOT, "examples", "accelerate_configs", "single_process.yaml")
    command = ["accelerate", "launch", "--config_file", config, os.path.join(ROOT, "examples", "train_janus.py")]
    options = ["--max_steps", "3", "--save_steps", "2", "--compare_scans", "8", "--output_dir", str(tmp_path / "run")]
    # Every emission of a user-visible Python warning is printed, not only the first of each place.
    result = subprocess.run(
        command + options,
        cwd=tmp_path,
        env={**env(), "PYTHONWARNINGS": "always::UserWarning,always::FutureWarning"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    for known in KNOWN_WARNINGS:
        assert known not in output, known
    progress = re.compile(r"\d+%\||it/s\]|s/it\]")  # tqdm's bars redraw the same text
    lines = [line.strip() for line in re.split(r"[\r\n]", result.stderr) if line.strip() and not progress.search(line)]
    repeated = {line: n for line, n in collections.Counter(lines).items() if n > 1}
    assert not repeated, repeated
    assert "step 3/3 | loss " in result.stdout and "unigame/" not in result.stdout


@pytest.mark.slow
def test_a_run_killed_after_its_first_checkpoint_resumes_to_the_same_weights(tmp_path):
    import signal
    import time

    from safetensors.torch import load_file

    script = os.path.join(ROOT, "examples", "train_janus.py")
    options = [
        "--max_steps",
        "16",
        "--save_steps",
        "4",
        "--picture_steps",
        "0",
        "--disable_tqdm",
        "true",
        "--compare_scans",
        "0",
    ]

    def launch(output_dir, *extra, **kwargs):
        command = ["accelerate", "launch", script, "--output_dir", str(output_dir), *options, *extra]
        return subprocess.Popen(command, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)

    full = launch(tmp_path / "full")
    assert full.wait(timeout=600) == 0, full.stderr.read()[-3000:]

    run = tmp_path / "killed"
    killed = launch(run, start_new_session=True)
    first = run / "checkpoint-4" / "trainer_state.json"
    deadline = time.time() + 600
    while not first.is_file() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    os.killpg(killed.pid, signal.SIGKILL)
    assert killed.wait(timeout=60) == -signal.SIGKILL
    assert not (run / "adapter_model.safetensors").exists()  # it never got to the end

    resumed = launch(run, "--resume_from_checkpoint", str(run / "checkpoint-4"))
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    for weights in ("adapter_model.safetensors", "perturber/model.safetensors"):
        expected, got = load_file(tmp_path / "full" / weights), load_file(run / weights)
        assert expected.keys() == got.keys()
        for name in expected:
            assert torch.equal(expected[name], got[name]), (weights, name)


@pytest.mark.slow
def test_two_process_ddp_keeps_ranks_identical_and_restores_each_buffer(tmp_path):
    out = tmp_path / "ddp"
    command = [
        "torchrun",
        "--nproc_per_node",
        "2",
        "--master_port",
        "29517",
        os.path.join(ROOT, "tests", "ddp_worker.py"),
    ]
    result = subprocess.run(command + [str(out)], env=env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rank0, rank1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    assert rank0["world"] == rank1["world"] == 2
    for name, value in rank0["params"].items():
        assert torch.equal(value, rank1["params"][name]), name
    assert any("lora_" in n for n in rank0["params"]) and any("perturber." in n for n in rank0["params"])
    checkpoint = out / "checkpoint-2"
    from trl_unigame.game.checkpoint import read_buffer_state

    saved = [read_buffer_state(str(checkpoint / f"unigame_buffer_rank{r}.safetensors")) for r in (0, 1)]
    assert all(len(s["hardness"]) > 0 for s in saved)
    assert saved[0]["hardness"] != saved[1]["hardness"]  # each rank mines its own shard

    # Resume both ranks from step 2: each must load its own buffer and end where the uninterrupted run ended.
    resumed = tmp_path / "resumed"
    result = subprocess.run(
        command[:-1]
        + ["--master_port", "29518", command[-1], str(resumed), "--resume_from_checkpoint", str(checkpoint)],
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for r in (0, 1):
        again = torch.load(resumed / f"rank{r}.pt")
        first = rank0 if r == 0 else rank1
        assert again["buffer"] == pytest.approx(first["buffer"])
        for name, value in first["params"].items():
            torch.testing.assert_close(again["params"][name], value, rtol=0, atol=1e-6, msg=name)


# Runs the example's command line as its `__main__` does, then writes what this rank trained (only the main process
# saves the model, so the other ranks' weights are seen this way).
EXAMPLE_RANK_WORKER = """
import os
import sys

import torch
from peft import get_peft_model_state_dict

sys.path.insert(0, {examples!r})
from train_janus import main, parse_arguments

trainer = main(*parse_arguments(sys.argv[1:]))
state = {{
    "adapter": {{n: t.detach().cpu() for n, t in get_peft_model_state_dict(trainer.model).items()}},
    "perturber": {{n: t.detach().cpu() for n, t in trainer.perturber.state_dict().items()}},
    "world": trainer.args.world_size,
}}
torch.save(state, os.path.join(trainer.args.output_dir, f"rank{{trainer.args.process_index}}.pt"))
"""


@pytest.mark.slow
def test_example_trains_on_two_processes_with_accelerate_launch(tmp_path):
    import socket

    from safetensors.torch import load_file

    worker = tmp_path / "train_janus_rank.py"
    worker.write_text(EXAMPLE_RANK_WORKER.format(examples=os.path.join(ROOT, "examples")))
    with socket.socket() as s:  # a free port, so parallel launches do not collide
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    out = tmp_path / "run"
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", port, str(worker)]
    options = ["--max_steps", "4", "--output_dir", str(out), "--compare_scans", "16", "--disable_tqdm", "true"]
    result = subprocess.run(
        command + options,
        cwd=tmp_path,
        env={**env(), "ACCELERATE_USE_CPU": "true"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("Saved the LoRA adapter") == 1
    # The before/after table, printed by the main process only.
    assert result.stdout.count("Accuracy on 16 held-out test scans, before and after training") == 1
    assert sum(line.startswith("| next digit: clean |") for line in result.stdout.splitlines()) == 1

    rank0, rank1 = (torch.load(out / f"rank{r}.pt") for r in (0, 1))
    assert rank0["world"] == rank1["world"] == 2
    saved = {
        "adapter": load_file(out / "adapter_model.safetensors"),
        "perturber": load_file(out / "perturber" / "model.safetensors"),
    }
    for part, weights in saved.items():
        assert weights.keys() == rank0[part].keys() == rank1[part].keys(), part
        for name, value in weights.items():
            assert torch.equal(rank0[part][name], value) and torch.equal(rank1[part][name], value), (part, name)
    assert any("lora_B" in n and rank0["adapter"][n].abs().sum() > 0 for n in rank0["adapter"])  # it trained


def test_qlora_trains_a_4bit_model(tmp_path, vqa):
    from peft import LoraConfig
    from transformers import BitsAndBytesConfig

    from trl_unigame import JanusInterface, UniGameConfig, UniGameTrainer

    # bitsandbytes' CPU kernels need layers at least 64 wide: the tiny vision tower (32) stays unquantized.
    skip = list(JanusInterface.QUANTIZATION_SKIP_MODULES) + ["model.vision_model", "model.aligner"]
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip
    )
    model, processor = tiny_janus(seed=0, hidden_size=64, quantization_config=quantization)
    assert model.is_loaded_in_4bit
    import bitsandbytes as bnb

    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.model.language_model.modules())
    args = UniGameConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        consistency_model=None,
        num_candidates=2,
        mining_interval=1,
        disable_tqdm=True,
    )
    trainer = UniGameTrainer(
        model, args, train_dataset=vqa, processing_class=processor, peft_config=LoraConfig(r=4, lora_alpha=8)
    )
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert before and all("lora_" in n for n in before)
    assert any(not torch.equal(before[n], after[n]) for n in before)


def test_push_to_hub_uploads_adapter_perturber_and_card(tmp_path, offline_hub):
    from huggingface_hub import ModelCard

    uploaded = offline_hub.folder
    run_example(
        tmp_path / "run",
        "--max_steps",
        "2",
        "--push_to_hub",
        "--hub_model_id",
        "someone/tiny-unigame",
        "--picture_steps",
        "0",
        "--save_steps",
        "100",
    )
    files = set(os.listdir(uploaded))
    assert {"adapter_model.safetensors", "adapter_config.json", "perturber", "README.md"} <= files
    assert not any(f.startswith("checkpoint-") for f in files)
    card = ModelCard.load(uploaded / "README.md")
    assert {"trl", "unigame"} <= set(card.data.tags)
    assert 'PeftModel.from_pretrained(base, "someone/tiny-unigame")' in card.text  # where it is loaded from now
    assert "@article" in card.text and '"num_candidates": 3' in card.text
    assert Perturber.from_pretrained(uploaded / "perturber").config.hidden_size == 128  # the digits model's LLM width


# ------------------------------------------------------------------------------------------- datasets
def test_vqav2_answers_reduce_to_the_majority():
    image = draw_shape("red", "circle")
    data = Dataset.from_dict(
        {
            "image": [image, image],
            "question": ["What color?", "What shape?"],
            "answers": [
                [{"answer": "red"}, {"answer": "blue"}, {"answer": "red"}],
                [{"answer": "round"}, {"answer": "circle"}, {"answer": "circle"}],
            ],
            "question_id": [1, 2],
        }
    )
    mapped = to_vqa_format(data)
    assert mapped["answer"] == ["red", "circle"]
    assert set(mapped.column_names) == {"image", "question", "answer"}
    plain = Dataset.from_dict({"image": [image], "question": ["?"], "answers": [["no", "yes", "yes"]]})
    assert to_vqa_format(plain)["answer"] == ["yes"]


def test_conversational_format_is_understood():
    image = draw_shape("blue", "square")
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What shape?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "square"}]},
    ]
    mapped = to_vqa_format(Dataset.from_dict({"messages": [messages], "images": [[image]]}))
    assert mapped[0]["question"] == "What shape?" and mapped[0]["answer"] == "square"


def test_missing_columns_are_named_with_the_columns_found():
    data = Dataset.from_dict({"img": [draw_shape("red", "square")], "q": ["?"], "label": ["red"]})
    with pytest.raises(
        ValueError, match=r"missing the column\(s\).*'image'.*'question'.*it has \['img', 'q', 'label'\]"
    ):
        to_vqa_format(data)
    mapped = to_vqa_format(data, image_column="img", question_column="q", answer_column="label")
    assert set(mapped.column_names) == {"image", "question", "answer"}


def test_pictures_show_source_candidate_and_prediction(tmp_path, vqa):
    from PIL import Image

    from trl_unigame.callbacks import HardSamplePicturesCallback

    trainer = run_example(tmp_path / "run", "--max_steps", "2", "--picture_steps", "2", "--save_steps", "100")
    callback = next(c for c in trainer.callback_handler.callbacks if isinstance(c, HardSamplePicturesCallback))
    assert callback.trainer is trainer
    entries = trainer.buffer.entries
    assert entries and all(e.extra["source"].dtype == torch.uint8 for e in entries)
    picture = Image.open(tmp_path / "run" / "pictures" / "hard_samples_step2.png")
    assert picture.size[1] > 16 * 6 * min(len(entries), callback.max_samples)  # one row (16 px x 6) per hard sample
    predictions = callback._predict(entries[:2])
    assert len(predictions) == 2 and all(isinstance(p, str) for p in predictions)


def test_pictures_need_no_matplotlib(monkeypatch):
    from trl_unigame.callbacks import HardSamplePicturesCallback

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    default = offline_default_arguments()
    assert default[default.index("--picture_steps") + 1] == "100"  # drawn with PIL: on in the plain install
    assert HardSamplePicturesCallback(every_n_steps=5).every_n_steps == 5


def test_real_path_loads_a_checkpoint_folder_and_a_local_dataset(tmp_path):
    from trl_unigame.testing import save_tiny_janus, tiny_clip, tiny_vqa_dataset

    model_dir = save_tiny_janus(str(tmp_path / "janus"), seed=0)
    tiny_clip(seed=0, save_dir=str(tmp_path / "clip"))
    rows = tiny_vqa_dataset(12, seed=1)
    vqav2 = Dataset.from_dict(
        {
            "picture": rows["image"],
            "query": rows["question"],
            "answers": [[{"answer": a}, {"answer": "other"}, {"answer": a}] for a in rows["answer"]],
        },
        features=None,
    ).cast_column("picture", rows.features["image"])
    vqav2.to_parquet(str(tmp_path / "train.parquet"))
    out = tmp_path / "run"
    trainer = main(
        *make_parser().parse_args_and_config(
            args=[
                "--model_name_or_path", model_dir, "--dtype", "float32",
                "--dataset_name", "parquet", "--dataset_data_files", str(tmp_path / "train.parquet"),
                "--image_column", "picture", "--question_column", "query",
                "--consistency_model", str(tmp_path / "clip"), "--consistency_threshold", "-1",
                "--use_peft", "--lora_r", "4", "--lora_alpha", "8",
                "--output_dir", str(out), "--max_steps", "2", "--per_device_train_batch_size", "2",
                "--num_candidates", "2", "--report_to", "none", "--use_cpu", "true", "--bf16", "false",
                "--disable_tqdm", "true", "--save_steps", "100", "--logging_steps", "1",
            ]
        )
    )  # fmt: skip
    assert trainer.consistency_scorer is not None
    assert any(log.get("unigame/consistency") is not None for log in trainer.state.log_history)
    card = (out / "README.md").read_text()  # a local base model is named by its folder, which exists
    assert f'AutoModelForImageTextToText.from_pretrained("{model_dir}")' in card and os.path.isdir(model_dir)
    assert f'"consistency_scorer": "CLIP {tmp_path / "clip"}"' in card
    assert f'"consistency_model": "{tmp_path / "clip"}"' in card
    assert trainer.train_dataset.column_names == ["image", "question", "answer"]
    assert set(trainer.train_dataset["answer"]) <= set(rows["answer"])
    assert (out / "perturber" / "model.safetensors").is_file() and (out / "adapter_config.json").is_file()


def test_real_path_names_the_columns_it_found(tmp_path):
    from trl_unigame.testing import save_tiny_janus

    model_dir = save_tiny_janus(str(tmp_path / "janus"), seed=0)
    Dataset.from_dict({"img": [draw_shape("red", "circle")], "text": ["?"]}).to_parquet(str(tmp_path / "d.parquet"))
    args = make_parser().parse_args_and_config(
        args=[
            "--model_name_or_path", model_dir, "--dataset_name", "parquet",
            "--dataset_data_files", str(tmp_path / "d.parquet"), "--output_dir", str(tmp_path / "out"),
            "--use_cpu", "true", "--bf16", "false", "--consistency_model", "none",
        ]
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"it has \['img', 'text'\]"):
        main(*args)
    assert not (tmp_path / "out").exists()


def test_model_card_names_base_model_dataset_tags_config_and_paper():
    from huggingface_hub import ModelCard

    from trl_unigame.model_card import unigame_model_card

    card = unigame_model_card(
        model_name="Janus-Pro-1B-UniGame",
        base_model="deepseek-community/Janus-Pro-1B",
        dataset_name="HuggingFaceM4/VQAv2",
        tags=["vqa"],
        unigame_config={"buffer_weight": 0.5, "selection": "paper"},
    )
    card = ModelCard(str(card))  # round-trips through the YAML header
    assert card.data.base_model == "deepseek-community/Janus-Pro-1B"
    assert card.data.datasets == ["HuggingFaceM4/VQAv2"]
    assert {"trl", "unigame", "vqa"} <= set(card.data.tags)
    assert '"selection": "paper"' in card.text and "arXiv:2511.19413" in card.text
    assert 'AutoModelForImageTextToText.from_pretrained("deepseek-community/Janus-Pro-1B")' in card.text
    assert 'PeftModel.from_pretrained(base, "Janus-Pro-1B-UniGame")' in card.text


FSDP_ON_CPU = """compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_version: 2
mixed_precision: 'no'
num_machines: 1
num_processes: 2
use_cpu: true
"""


@pytest.mark.slow
def test_processes_launched_together_that_would_train_apart_are_refused(tmp_path):
    import socket

    config = tmp_path / "fsdp_cpu.yaml"
    config.write_text(FSDP_ON_CPU)  # accelerate does not shard on a CPU: each process would train alone
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    out = tmp_path / "run"
    command = ["accelerate", "launch", "--config_file", str(config), "--main_process_port", port]
    command.append(os.path.join(ROOT, "examples", "train_janus.py"))
    # `--use_cpu false` given: the CPU FSDP launch is not read as `--use_cpu true` (which shards, see below)
    result = subprocess.run(
        command + ["--max_steps", "2", "--output_dir", str(out), "--use_cpu", "false"],
        cwd=tmp_path,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0
    assert "2 processes were launched together, but the Trainer runs in each of them alone" in result.stderr
    assert "accelerate launch --multi_gpu --num_processes 2" in result.stderr
    assert not (out / "adapter_model.safetensors").exists()  # nothing trained, nothing written as if it had


def test_help_and_start_name_the_offline_defaults_settings():
    from train_janus import effective_settings, parse_arguments

    shown = subprocess.run(
        [sys.executable, os.path.join(ROOT, "examples", "train_janus.py"), "--help"],
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    shown = " ".join(shown.split())  # argparse wraps the description
    assert "the offline default runs" in shown and "--learning_rate 1e-3" in shown  # not only the generic 2e-05
    # each option the offline default sets shows the value it runs with beside its own default
    # --perturber_budget
    assert "Without --model_name_or_path: relative. With a model of your own: relative. (default: absolute)" in shown
    assert "Without --model_name_or_path: digit_judge. (default: openai/clip-vit-base-patch16)" in shown
    import evaluate_janus

    shown = " ".join(evaluate_janus.make_parser().format_help().split())
    assert "Without --model_name_or_path: 0.02 0.05. (default: [0.02])" in shown
    assert "Without --model_name_or_path: relative. (default: absolute)" in shown
    assert "Without --model_name_or_path: noise_3 blur_3 jpeg_3 contrast_3. (default: [])" in shown
    _, training_args, model_args = parse_arguments(["--max_steps", "7"])
    line = effective_settings(["--max_steps", "7"], training_args, model_args)
    assert "max_steps=7" in line and "learning_rate=0.001" in line and "perturber_budget=relative" in line


# ------------------------------------------------------------------------------------- your own data
def digits_imagefolder(folder, skills=("even",), scans=12):
    """An `imagefolder` of digit scans with a `metadata.jsonl` (`file_name`, `question`, `answer`), as a user's."""
    import json

    from trl_unigame.testing import digits_vqa_dataset

    folder.mkdir(parents=True)
    rows = digits_vqa_dataset("train", skills=skills, seed=2, max_scans=scans)
    with open(folder / "metadata.jsonl", "w") as f:
        for index, row in enumerate(rows):
            row["image"].save(folder / f"{index}.png")
            f.write(json.dumps({"file_name": f"{index}.png", "question": row["question"], "answer": row["answer"]}))
            f.write("\n")
    return rows


def test_own_imagefolder_trains_the_shipped_model_with_the_working_settings(tmp_path, capsys):
    import json

    from train_janus import run

    from trl_unigame.digit_judge import DigitJudge

    rows = digits_imagefolder(tmp_path / "mydata" / "train")
    out = tmp_path / "run"
    data_files = str(tmp_path / "mydata" / "train" / "*")
    argv = ["--dataset_name", "imagefolder", "--dataset_data_files", data_files, "--max_steps", "2"]
    trainer = run(argv + ["--output_dir", str(out), "--disable_tqdm", "true", "--picture_steps", "0"])
    # the user's rows, not the built-in digits
    assert len(trainer.train_dataset) == len(rows) == 12
    assert set(trainer.train_dataset["question"]) == set(rows["question"]) == {"Is the digit even?"}
    assert sorted(trainer.train_dataset["answer"]) == sorted(rows["answer"])
    # the shipped model with the offline default's settings: LoRA, relative budgets, the digit judge (no CLIP)
    assert isinstance(trainer.model, PeftModel) and trainer.args.learning_rate == 1e-3
    assert trainer.args.perturber_budget == "relative" and trainer.args.num_candidates == 3
    assert isinstance(trainer.consistency_scorer, DigitJudge) and trainer.args.consistency_model is None
    printed = capsys.readouterr().out
    assert "on your dataset" in printed and "dataset_name=imagefolder" in printed
    assert "step 1/2 | loss " in printed and "step 2/2 | loss " in printed
    assert "held-out test scans" not in printed  # the digits' before/after table is not about these rows
    assert f"python examples/evaluate_janus.py --adapters {out}" in printed
    with open(out / "training_data.json") as f:
        record = json.load(f)
    assert record["dataset_name"] == "imagefolder" and record["dataset_data_files"] == data_files
    assert (out / "adapter_model.safetensors").is_file()

    # evaluate_janus.py reads the record back: the user's rows, their only split
    import evaluate_janus

    args, given = evaluate_janus.parse_arguments(["--adapters", str(out)])
    assert evaluate_janus.apply_training_data(args, given) == ("digit",)
    assert (args.dataset_name, args.dataset_data_files) == ("imagefolder", data_files)
    dataset = evaluate_janus.load_data(args, given)
    assert len(dataset) == 12 and set(dataset["question"]) == {"Is the digit even?"}


def test_consistency_model_none_on_the_command_line_turns_the_filter_off():
    from train_janus import consistency_scorer_for, parse_arguments

    _, training_args, _ = parse_arguments(["--consistency_model", "none"])
    assert training_args.consistency_model is None and consistency_scorer_for(training_args) is None
    _, training_args, _ = parse_arguments([])
    assert training_args.consistency_model == "digit_judge"


def test_the_shipped_models_folder_named_as_the_model_gets_the_offline_defaults_settings():
    from train_janus import parse_arguments

    from trl_unigame.testing import pretrained_tiny_janus_path

    argv = ["--model_name_or_path", pretrained_tiny_janus_path(), "--dataset_name", "imagefolder", "--max_steps", "3"]
    script_args, training_args, model_args = parse_arguments(argv)
    assert model_args.model_name_or_path is None and script_args.dataset_name == "imagefolder"
    assert training_args.perturber_budget == "relative" and training_args.consistency_model == "digit_judge"
    assert training_args.max_steps == 3 and model_args.use_peft


# ------------------------------------------------------------------------------- bad command lines
def usage_error(argv):
    """The one-line refusal of a command line, from the checks the script runs before loading anything."""
    from train_janus import UsageError, check_arguments, parse_arguments

    with pytest.raises(UsageError) as error:
        check_arguments(*parse_arguments(argv))
    message = str(error.value)
    assert "\n" not in message
    return message


def test_bad_command_lines_are_refused_before_anything_loads(tmp_path, monkeypatch):
    import errno
    import tempfile

    out = ["--output_dir", str(tmp_path / "run")]
    assert "--max_steps N with N >= 1" in usage_error(["--max_steps", "0", *out])
    # an output folder that cannot be written: under a file, on a read-only file system
    (tmp_path / "file").write_text("")
    assert "cannot be written" in usage_error(["--output_dir", str(tmp_path / "file" / "run")])
    with monkeypatch.context() as patch:

        def read_only(*args, **kwargs):
            raise OSError(errno.EROFS, "Read-only file system")

        patch.setattr(tempfile, "mkdtemp", read_only)
        message = usage_error(["--output_dir", str(tmp_path / "ro" / "run")])
        assert "cannot be written" in message and "Read-only file system" in message
    # a model folder that does not exist, however it is written
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    for name in ("./janus", str(tmp_path / "janus"), "~/no-such-janus", "models/janus", "not a repo id"):
        message = usage_error(["--model_name_or_path", name, "--dataset_name", "parquet", *out])
        assert f"--model_name_or_path {name}: the folder does not exist" in message
    # a Hub id that is not cached while the Hub is off (HF_HUB_OFFLINE=1 in the tests)
    message = usage_error(["--model_name_or_path", "someone/no-such-model", "--dataset_name", "parquet", *out])
    assert "HF_HUB_OFFLINE=1" in message and "local cache" in message
    assert "needs --dataset_name" in usage_error(["--model_name_or_path", str(tmp_path / "models"), *out])
    # the CLIP default while offline: at once, with the command line's syntax
    message = usage_error(["--consistency_model", "someone/no-such-clip", *out])
    assert "--consistency_model none" in message and "consistency_model=None" not in message
    # uploading while offline, and with no network
    assert "--push_to_hub needs the Hub" in usage_error(["--push_to_hub", *out])
    import socket

    import trl_unigame.consistency

    def no_network(*args, **kwargs):
        raise socket.gaierror(-2, "Name or service not known")

    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setattr(trl_unigame.consistency, "hub_offline", lambda: False)
    monkeypatch.setattr(socket, "create_connection", no_network)
    message = usage_error(["--push_to_hub", *out])
    assert "cannot be reached (Name or service not known)" in message
    assert not (tmp_path / "run").exists()


def test_a_bad_command_line_fails_at_once_in_one_line_printed_once(tmp_path):
    import socket
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    command = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", port]
    command += [os.path.join(ROOT, "examples", "train_janus.py"), "--max_steps", "0", "--output_dir", "run"]
    start = time.time()
    result = subprocess.run(
        command, cwd=tmp_path, env={**env(), "ACCELERATE_USE_CPU": "true"}, capture_output=True, text=True, timeout=300
    )
    assert result.returncode != 0 and time.time() - start < 120
    lines = [line for line in result.stderr.splitlines() if "error: --max_steps 0 trains nothing" in line]
    assert len(lines) == 1, result.stderr[-3000:]  # one line, from the first process only
    assert "Traceback" not in result.stderr.split(lines[0])[0]  # nothing raised before it
    assert not (tmp_path / "run").exists()


def test_an_fsdp_launch_on_the_cpu_is_use_cpu(monkeypatch):
    import train_janus

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if hasattr(torch, "accelerator"):
        monkeypatch.setattr(torch.accelerator, "is_available", lambda: False)
    assert train_janus.parse_arguments(["--max_steps", "2"])[1].use_cpu is True
    assert train_janus.parse_arguments(["--use_cpu", "false"])[1].use_cpu is False  # given: kept
    monkeypatch.delenv("ACCELERATE_USE_FSDP")
    assert train_janus.launcher_options(set()) == []


@pytest.mark.slow
def test_fsdp_cpu_config_alone_shards_on_two_cpu_processes(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    config = os.path.join(ROOT, "examples", "accelerate_configs", "fsdp_cpu.yaml")
    command = ["accelerate", "launch", "--config_file", config, "--main_process_port", port]
    command += [os.path.join(ROOT, "examples", "train_janus.py"), "--max_steps", "2", "--output_dir", "run"]
    command += ["--compare_scans", "0", "--picture_steps", "0", "--disable_tqdm", "true", "--save_steps", "2"]
    result = subprocess.run(command, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 2/2 | loss " in result.stdout
    assert (tmp_path / "run" / "checkpoint-2" / "pytorch_model_fsdp_0").is_dir()  # FSDP's own sharded checkpoint
    assert (tmp_path / "run" / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------- threads
def test_the_example_shares_the_cores_among_its_processes(monkeypatch):
    import train_janus

    threads = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # set by the launcher (and by these tests): kept
        assert train_janus.set_cpu_threads() == torch.get_num_threads() == threads
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
        monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.1, 0.1))
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert train_janus.set_cpu_threads() == torch.get_num_threads() == 4
        monkeypatch.setattr(os, "getloadavg", lambda: (6.8, 6.0, 5.0))  # other work keeps 7 of the 8 cores busy
        assert train_janus.set_cpu_threads() == 1
    finally:
        torch.set_num_threads(threads)


def test_subprocesses_of_the_tests_run_one_thread():
    assert os.environ["OMP_NUM_THREADS"] == "1"
    code = "import torch; print(torch.get_num_threads())"
    shown = subprocess.run([sys.executable, "-c", code], env=os.environ, capture_output=True, text=True, timeout=120)
    assert shown.stdout.strip() == "1"


# ---------------------------------------------------------------------- evaluating what was trained
def test_evaluation_asks_the_adapter_the_skill_it_was_trained_on_and_the_old_one(tmp_path, capsys):
    import json

    import evaluate_janus

    out = tmp_path / "unigame-janus-tiny"
    run_example(out, "--max_steps", "1", "--picture_steps", "0", "--save_steps", "100")
    with open(out / "training_data.json") as f:
        assert json.load(f)["digits_skills"] == ["after", "digit"]
    options = ["--adapters", str(out), "--max_samples", "8", "--attack_steps", "1", "--attack_eps", "0.02"]
    options += ["--corruptions", "blur_1", "--consistency", "false", "--reverse_consistency", "false"]
    results = evaluate_janus.main(*evaluate_janus.parse_arguments(options + ["--output_dir", str(tmp_path / "ev")]))
    assert list(results) == ["base", "unigame-janus-tiny"]
    for metrics in results.values():
        assert {"next_digit/clean/vqa_accuracy", "digit/clean/vqa_accuracy"} <= set(metrics)
        assert {"next_digit/attack_rel0.02/vqa_accuracy", "digit/corrupt_blur_1/vqa_accuracy"} <= set(metrics)
    printed = capsys.readouterr().out
    assert "'What digit is after this?'" in printed and "| unigame-janus-tiny | next_digit/clean |" in printed
    # without a record (an adapter from elsewhere), the pretrained skill as before
    (out / "training_data.json").unlink()
    args, given = evaluate_janus.parse_arguments(["--adapters", str(out)])
    assert evaluate_janus.apply_training_data(args, given) == ("digit",)


def test_before_after_table_names_the_skill_and_compares_plain_fine_tuning(tmp_path, capsys):
    argv = offline_default_arguments(str(tmp_path / "run")) + ["--disable_tqdm", "true", "--picture_steps", "0"]
    trainer = main(*make_parser().parse_args_and_config(args=argv + ["--max_steps", "2", "--save_steps", "100",
                                                                     "--compare_scans", "8", "--compare_sft", "true"]))  # fmt: skip
    printed = capsys.readouterr().out
    assert "| | before training | after UniGame | after plain fine-tuning |" in printed
    rows = table_rows(printed)
    assert set(rows) == {
        "next digit: clean",
        "next digit: under attack (2%)",
        "next digit: round trip",
        "generation judged right",
        "this digit (pretrained): clean",
    }
    assert all(len(values) == 3 for values in rows.values())
    assert "'after'" not in printed  # the skill is named by what it asks
    # the run's own settings are the recipe that measured best (docs/benchmarks.md)
    assert trainer.args.perturber_inputs == "features_and_gradient" and trainer.args.perturber_update == "first_order"
    assert trainer.args.perturbed_weight == 0.5
    assert not any(name.startswith("tmp") for name in os.listdir(tmp_path / "run"))  # the plain run saved nothing


# ---------------------------------------------------------------------- what a user runs prints no warning
def run_python(code, cwd):
    """Runs `code` as a user's script would run, every emission of a user-visible warning printed."""
    return subprocess.run(
        [sys.executable, "-c", code],
        cwd=cwd,
        env={**env(), "PYTHONWARNINGS": "always::UserWarning,always::FutureWarning"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_model_cards_usage_code_runs_without_a_warning(tmp_path):
    out = tmp_path / "run"
    run_example(out, "--max_steps", "1", "--picture_steps", "0", "--save_steps", "100")
    code = usage_snippet((out / "README.md").read_text())
    result = run_python(code + "\nprint(type(model).__name__, perturber.config.hidden_size)", tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "PeftModelForCausalLM 128" in result.stdout
    for warning in ("FutureWarning", "UserWarning", "config.json not found"):
        assert warning not in result.stderr, result.stderr[-3000:]


def test_the_quick_starts_python_code_runs_without_a_peft_warning(tmp_path):
    import json
    import re
    import tempfile

    with open(os.path.join(ROOT, "docs", "quickstart.md")) as f:
        code = re.search(r"## In Python\n\n```python\n(.*?)```", f.read(), flags=re.DOTALL).group(1)
    result = run_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Could not find a config file" not in result.stderr, result.stderr[-3000:]
    out = tmp_path / "unigame-tiny"
    with open(out / "adapter_config.json") as f:  # the tiny model's temporary folder is gone: it is not named
        assert json.load(f)["base_model_name_or_path"] is None
    assert tempfile.gettempdir() not in (out / "README.md").read_text()


def test_the_evaluation_writes_beside_the_adapter_not_into_the_working_folder(tmp_path):
    out = tmp_path / "unigame-janus-tiny"
    run_example(out, "--max_steps", "1", "--picture_steps", "0", "--save_steps", "100")
    work = tmp_path / "clone"
    work.mkdir()
    options = ["--adapters", str(out), "--max_samples", "4", "--attack_steps", "1", "--corruptions", "noise_1"]
    options += ["--consistency", "false", "--reverse_consistency", "false"]
    script = os.path.join(ROOT, "examples", "evaluate_janus.py")
    result = subprocess.run(
        [sys.executable, script, *options], cwd=work, env=env(), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.listdir(work) == []  # nothing left in the working folder (a clone stays clean)
    assert f"written to {out / 'evaluation' / 'results.json'}" in result.stdout
    assert (out / "evaluation" / "results.json").is_file()
    assert "Warning" not in result.stderr, result.stderr[-3000:]  # e.g. PEFT's deprecated-property FutureWarning


def test_a_model_of_your_own_starts_from_the_recipe_with_relative_budgets(tmp_path):
    from train_janus import make_parser, parse_arguments, show_offline_defaults

    folder = str(tmp_path / "my-janus")  # parsing only: nothing is loaded
    _, training, model = parse_arguments(["--model_name_or_path", folder, "--dataset_name", "imagefolder"])
    assert model.model_name_or_path == folder
    assert (training.perturber_inputs, training.perturber_update, training.perturbed_weight) == (
        "features_and_gradient",
        "first_order",
        0.5,
    )
    assert (training.perturber_budget, training.perturber_generation_budget) == ("relative", "relative")
    assert training.mining_image_size is None and training.generation_guidance_scale is None  # the model's own
    assert training.max_steps == -1  # nothing of the digits run's sizes
    _, kept, _ = parse_arguments(
        ["--model_name_or_path", folder, "--perturber_update", "exact", "--perturber_budget", "absolute"]
    )
    assert (kept.perturber_update, kept.perturber_budget, kept.perturbed_weight) == ("exact", "absolute", 0.5)
    help_text = show_offline_defaults(make_parser(), []).format_help()
    assert "With a model of your own: features_and_gradient." in " ".join(help_text.split())
