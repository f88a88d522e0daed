# Copyright 2026 The trl-unigame authors. Licensed under the Apache License, Version 2.0.
"""
Peak memory per process of the game under DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3 with 2 processes on one machine's
CPUs (gloo), at Janus-Pro-1B's shapes (random weights; by default 2 of the LLM's 24 layers and 2 of the vision
tower's 24, every other size real: the 102,400-token vocabulary, 2048 hidden, SigLIP-L at 384 px, the VQ model).

Each engine is a `torchrun --nproc_per_node 2` launch of this script, which trains the game (LoRA on the LLM,
first-order perturber step, mining every step with one candidate per row, the buffer pass) for a few steps with
`trl_unigame.testing.cpu_sharding_arguments`. A thread samples each process's resident memory (RSS) every 20 ms from
the start of training, and the peaks are reported apart for mining rounds (where the game gathers the whole model:
`full_parameters`) and for the rest of the step, beside the parameter bytes each process holds while training.

```bash
python benchmarks/sharded_memory.py --output_json sharded_memory.json          # ddp fsdp2 zero2 zero3, 2 steps each
python benchmarks/sharded_memory.py --engines ddp fsdp2 --llm_layers 4           # fewer engines, more layers
```

CPU RSS stands in for accelerator memory here; on GPUs the same launches report `torch.cuda.max_memory_allocated`
through `scripts/check_distributed_gpu.sh`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class RssSampler:
    """Samples this process's resident memory in a thread; keeps the peak inside and outside `phase` windows."""

    def __init__(self, interval: float = 0.02):
        import psutil

        self.process = psutil.Process()
        self.interval = interval
        self.phase = "step"
        self.peaks: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            rss = self.process.memory_info().rss
            self.peaks[self.phase] = max(self.peaks.get(self.phase, 0), rss)
            time.sleep(self.interval)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()


def build_model(llm_layers: int, vision_layers: int):
    import torch
    from transformers import JanusForConditionalGeneration, JanusImageProcessorPil, JanusProcessor

    from trl_unigame.testing import janus_pro_config, tiny_janus

    tiny, processor = tiny_janus(seed=0)
    config = janus_pro_config("1b", image_token_id=tiny.config.image_token_id)
    config.text_config.num_hidden_layers = llm_layers
    config.vision_config.num_hidden_layers = vision_layers
    torch.manual_seed(0)
    model = JanusForConditionalGeneration(config)
    model.generation_config = tiny.generation_config
    processor = JanusProcessor(
        image_processor=JanusImageProcessorPil(size={"height": 384, "width": 384}, min_size=4),
        tokenizer=processor.tokenizer,
        chat_template=processor.chat_template,
        num_image_tokens=576,
    )
    return model, processor


def worker(engine: str, output_dir: str, llm_layers: int, vision_layers: int, steps: int) -> None:
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback

    from trl_unigame import UniGameConfig, UniGameTrainer
    from trl_unigame.testing import cpu_sharding_arguments, full_elements, local_elements, tiny_vqa_dataset

    model, processor = build_model(llm_layers, vision_layers)
    sampler = RssSampler()
    held = {}

    class Sample(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            sampler.start()

        def on_step_end(self, args, state, control, **kwargs):
            held["parameter_bytes"] = sum(local_elements(p) * p.element_size() for p in trainer.model.parameters())

    args = UniGameConfig(
        output_dir=output_dir,
        **cpu_sharding_arguments(engine),
        per_device_train_batch_size=1,
        max_steps=steps,
        learning_rate=1e-4,
        save_strategy="no",
        report_to=[],
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        perturber_update="first_order",
        num_candidates=1,
        mining_interval=1,
        consistency_model=None,
        consistency_threshold=0.0,
        hardness_quantile=0.0,
        buffer_batch_size=1,
        generation_loss_weight=0.0,
        seed=0,
    )
    trainer = UniGameTrainer(
        model,
        args,
        train_dataset=tiny_vqa_dataset(8, seed=0),
        processing_class=processor,
        peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"]),
        consistency_scorer=lambda images, texts: torch.ones(len(texts)),
        callbacks=[Sample()],
    )
    mine = trainer.miner.mine

    def mine_and_mark(*a, **k):  # the peaks of mining rounds apart (the whole model is gathered around them)
        sampler.phase = "mining"
        try:
            return mine(*a, **k)
        finally:
            sampler.phase = "step"

    trainer.miner.mine = mine_and_mark
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    sampler.stop()
    rank = int(os.environ["RANK"])
    result = {
        "engine": engine,
        "rank": rank,
        "peak_rss_step": sampler.peaks.get("step", 0),
        "peak_rss_mining": sampler.peaks.get("mining", 0),
        "parameter_bytes": held.get("parameter_bytes"),
        "full_parameter_bytes": sum(full_elements(p) * p.element_size() for p in trainer.model.parameters()),
        "seconds_per_step": seconds / steps,
        "mined": [log.get("unigame/mined") for log in trainer.state.log_history if "loss" in log],
    }
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def launch(engine: str, args, port: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as out:
        command = [
            "torchrun",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(port),
            os.path.abspath(__file__),
            "--worker",
            engine,
            "--worker_dir",
            out,
            "--llm_layers",
            str(args.llm_layers),
            "--vision_layers",
            str(args.vision_layers),
            "--steps",
            str(args.steps),
        ]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"the {engine} launch failed:\n{result.stderr[-4000:]}")
        ranks = []
        for rank in (0, 1):
            with open(os.path.join(out, f"rank{rank}.json")) as f:
                ranks.append(json.load(f))
        return ranks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", nargs="+", default=["ddp", "fsdp2", "zero2", "zero3"])
    parser.add_argument("--llm_layers", type=int, default=2)
    parser.add_argument("--vision_layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--output_json", default=None)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker_dir", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.worker_dir, args.llm_layers, args.vision_layers, args.steps)
        return
    rows = []
    for i, engine in enumerate(args.engines):
        ranks = launch(engine, args, 29700 + i)
        gib = 2**30
        row = {
            "engine": engine,
            "peak_rss_step_gib": max(r["peak_rss_step"] for r in ranks) / gib,
            "peak_rss_mining_gib": max(r["peak_rss_mining"] for r in ranks) / gib,
            "parameter_gib": max(r["parameter_bytes"] for r in ranks) / gib,
            "full_parameter_gib": ranks[0]["full_parameter_bytes"] / gib,
            "seconds_per_step": max(r["seconds_per_step"] for r in ranks),
            "ranks": ranks,
        }
        rows.append(row)
        print(
            f"{engine:>6}: peak RSS per process {row['peak_rss_step_gib']:.2f} GiB in the step, "
            f"{row['peak_rss_mining_gib']:.2f} GiB while mining; parameters held {row['parameter_gib']:.2f} of "
            f"{row['full_parameter_gib']:.2f} GiB; {row['seconds_per_step']:.1f} s/step",
            flush=True,
        )
    print("\n| engine | peak RSS, step (GiB) | peak RSS, mining (GiB) | parameters held (GiB) | s/step |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['engine']} | {row['peak_rss_step_gib']:.2f} | {row['peak_rss_mining_gib']:.2f} | "
            f"{row['parameter_gib']:.2f} of {row['full_parameter_gib']:.2f} | {row['seconds_per_step']:.1f} |"
        )
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"args": vars(args), "rows": rows, "machine": sys.platform}, f, indent=2)


if __name__ == "__main__":
    main()
