# Copyright 2026 The trl-unigame authors. Licensed under the Apache License, Version 2.0.
"""
Step-time and peak-memory overhead of UniGame against a plain `transformers.Trainer` step on the same model and batch.

```bash
python benchmarks/step_overhead.py                      # tiny random Janus on CPU (Python overhead dominates)
python benchmarks/step_overhead.py --preset compute     # a 25M-parameter Janus whose step is compute-bound on CPU
python benchmarks/step_overhead.py --shapes janus-pro-1b --dtype bfloat16   # Janus-Pro-1B's architecture, random weights (GPU)
python benchmarks/step_overhead.py --model_name_or_path deepseek-community/Janus-Pro-1B --batch_size 4 --dtype bfloat16
```

Each variant runs in its own process (so peak memory is its own) for `--steps` optimizer steps; the mean step
time after `--warmup` steps is compared (with mining every m steps, make `--steps - --warmup` a multiple of m).
`--repeats N` runs all variants in turn N times and reports, per variant, the median over rounds of its ratio to the
plain step of the same round: a machine whose speed drifts between processes moves both sides of each ratio.
`--variants` picks a subset (the plain step always runs). Prints one line per variant and the ratios to the plain
step, and the mining throughput (image tokens per second) of `generate_images`, eager and with its one-token step
compiled, against transformers' `generate(generation_mode="image")` plus `decode_image_tokens` on the same model,
batch, guidance and token count. `--output_json` keeps it all.

```bash
python benchmarks/step_overhead.py --preset compute --variants game_no_mining game_no_mining_first_order \
    game_no_mining_first_order_gradient --repeats 3 --skip_mining --steps 10 --warmup 2   # about 5 minutes
```
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time


VARIANTS = {
    "plain": "plain Trainer step (clean loss only)",
    "game_no_mining": "UniGame step without mining (perturber step + clean + buffer)",
    "game_no_mining_first_order": "UniGame step without mining, first-order perturber step",
    "game_no_mining_first_order_gradient": "UniGame step without mining, first-order step, gradient-reading perturber",
    "game_m1": "UniGame step, mining every step (m = 1, the default)",
    "game_m4": "UniGame step, mining every 4 steps (m = 4)",
    "game_m4_first_order": "UniGame step, mining every 4 steps, first-order perturber step",
    "game_m4_two_pass": "UniGame step, mining every 4 steps, clean and buffer as two passes (one_pass_update=False)",
    "game_m1_small_grid": "UniGame step, mining every step on the smaller grid (mining_image_size)",
    "game_generation_adversary": "UniGame step, mining every step, with the generation-side adversary (REINFORCE)",
    "authors": "the authors' structure: separate buffer step, mining every step",
}
# Candidates on a smaller token grid for the `small_grid` variant, per model: about 2/3 of the side (Janus-Pro: 256 px,
# 16 x 16 tokens, against 384 px and 24 x 24).
SMALL_GRID = {"tiny": 8, "compute": 24, "janus-pro-1b": 256, "janus-pro-7b": 256}


def build_model(args):
    """The benchmark's model: a checkpoint, the tiny random Janus, Janus-Pro's real shapes with random weights, or the
    compute-bound preset (LLM hidden 512, 6 layers, 64 image tokens, random weights)."""
    import torch

    from trl_unigame.testing import tiny_janus

    if args.model_name_or_path:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        model = AutoModelForImageTextToText.from_pretrained(args.model_name_or_path, dtype=getattr(torch, args.dtype))
        return model, AutoProcessor.from_pretrained(args.model_name_or_path)
    if args.preset == "tiny":
        return tiny_janus(seed=0)
    from transformers import JanusConfig, JanusForConditionalGeneration, JanusImageProcessorPil, JanusProcessor

    from trl_unigame.testing import janus_pro_config, tiny_janus_config

    tiny, processor = tiny_janus(seed=0)
    if args.preset.startswith("janus-pro"):
        # The real architecture with random weights; the small offline tokenizer stands in for the real one (its ids
        # all fall inside the real vocabulary), so prompts are short but every layer has its real size.
        config = janus_pro_config(args.preset.split("-")[-1], image_token_id=tiny.config.image_token_id)
        image_size, tokens = 384, 576
    else:
        config = tiny_janus_config(vocab_size=len(processor.tokenizer), hidden_size=512).to_dict()
        config["text_config"].update(
            num_hidden_layers=6, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=8
        )
        config["vision_config"].update(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, image_size=32)
        config["vision_config"]["num_image_tokens"] = 64
        config["vq_config"].update(num_patches=8)
        for key in ("model_type", "transformers_version", "architectures"):
            config.pop(key, None)
        config = JanusConfig(**config)
        image_size, tokens = 32, 64
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = JanusForConditionalGeneration(config).to(dtype)
    model.generation_config = tiny.generation_config
    processor = JanusProcessor(
        image_processor=JanusImageProcessorPil(size={"height": image_size, "width": image_size}, min_size=4),
        tokenizer=processor.tokenizer,
        chat_template=processor.chat_template,
        num_image_tokens=tokens,
    )
    return model, processor


def mining_throughput(args) -> dict:
    """Image tokens per second of `generate_images` (eager, and with its one-token step compiled) and of transformers'
    `generate(generation_mode="image")`, greedy, same prompts, batch, guidance and token count. The runs interleave
    (one of each per round), so a drift in the machine's speed hits all of them alike; the ratios are the median of
    the per-round ratios. Both sides return images: transformers' tokens go through its `decode_image_tokens`."""
    import torch
    from transformers import CompileConfig

    from trl_unigame import get_interface

    model, processor = build_model(args)
    if torch.cuda.is_available():
        model.to("cuda")
    model.eval()
    interface = get_interface(model, processor)
    prompts = [f"A red square number {i}." for i in range(args.batch_size * args.num_candidates)]
    texts = [interface._chat_prompt(p, with_image=False) for p in prompts]
    enc = processor(text=texts, generation_mode="image", return_tensors="pt", padding=True).to(interface.device)
    # transformers' defaults: inductor, "reduce-overhead" (CUDA graphs on a GPU; plain inductor on a CPU)
    compiled = CompileConfig()
    sizes = args.mining_sizes or [None]  # the first: the model's own size

    def ours(size, compile_config=None):
        kwargs = {} if size == sizes[0] else {"image_size": size}
        return lambda: interface.generate_images(
            prompts, guidance_scale=3.0, temperature=0.0, compile_config=compile_config, **kwargs
        )

    runs = {"transformers_generate": lambda: model.decode_image_tokens(
        model.generate(**enc, generation_mode="image", do_sample=False, guidance_scale=3.0)
    )}  # fmt: skip
    for size in sizes:
        suffix = "" if size == sizes[0] else f"_{size}px"
        runs[f"generate_images{suffix}"] = ours(size)
        runs[f"generate_images_compiled{suffix}"] = ours(size, compiled)
    times = {name: [] for name in runs}
    with torch.no_grad():
        start = time.perf_counter()
        runs["generate_images_compiled"]()  # compiles
        compile_s = time.perf_counter() - start
        for run in runs.values():
            run()  # warm-up
        for _ in range(args.mining_rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                run()
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times[name].append(time.perf_counter() - start)
    result = {}
    for name, t in times.items():
        grid = interface.generation_grid(int(name.rsplit("_", 1)[1][:-2])) if name.endswith("px") else None
        per_image = grid * grid if grid else interface.num_image_tokens
        result[name] = len(prompts) * per_image / statistics.median(t)
    reference = times["transformers_generate"]
    for name in times:
        if name.startswith("generate_images"):  # image tokens per second over transformers' (same prompts and batch)
            tokens_ratio = result[name] / result["transformers_generate"]
            result[f"{name}_ratio"] = (
                tokens_ratio
                if name.endswith("px")
                else statistics.median(r / t for r, t in zip(reference, times[name]))
            )
    result["compile_s"] = compile_s
    return result


def run_variant(variant, args):
    import torch
    from peft import LoraConfig
    from transformers import Trainer, TrainerCallback

    from trl_unigame import UniGameConfig, UniGameTrainer, get_interface
    from trl_unigame.testing import tiny_vqa_dataset

    model, processor = build_model(args)
    data = tiny_vqa_dataset(args.batch_size * (args.steps + 1), seed=0, image_size=64)
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        model.to("cuda")
    config = UniGameConfig(
        output_dir=os.path.join(args.output_dir, variant),
        per_device_train_batch_size=args.batch_size,
        max_steps=args.steps,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=10**6,
        use_cpu=not on_gpu,
        bf16=args.dtype == "bfloat16" and on_gpu,
        consistency_model=None,
        mining_interval=0 if "no_mining" in variant else 4 if "m4" in variant else 1,
        perturber_update="first_order" if "first_order" in variant else "exact",
        perturber_inputs="features_and_gradient" if variant.endswith("gradient") else "features",
        understanding_update="separate" if variant == "authors" else "mixed",
        one_pass_update=not variant.endswith("two_pass"),
        mining_image_size=SMALL_GRID[args.preset] if variant.endswith("small_grid") else None,
        generation_adversary="reinforce" if variant == "game_generation_adversary" else "none",
        num_candidates=args.num_candidates,
        buffer_batch_size=args.batch_size,
        hardness_quantile=0.0,
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05)
    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            if on_gpu:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            if on_gpu:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

    if variant == "plain":
        from trl_unigame.data import UniGameDataCollator
        from trl_unigame.unigame_trainer import prepare_understanding_player

        interface = get_interface(model, processor)
        model = prepare_understanding_player(model, interface, lora)
        interface = get_interface(model, processor)
        collator = UniGameDataCollator(interface)

        class PlainTrainer(Trainer):
            def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
                inputs.pop("unigame_rows", None)
                return interface.understanding_loss(model, inputs).mean()

        trainer = PlainTrainer(model, config, train_dataset=data, data_collator=collator, callbacks=[Timer()])
    else:
        # The generation-side adversary needs a consistency scorer: one that passes every candidate and costs nothing,
        # so the variant's extra time is the adversary's teacher-forced pass and its backward alone.
        scorer = (lambda images, texts: torch.ones(len(texts))) if variant == "game_generation_adversary" else None
        trainer = UniGameTrainer(
            model,
            config,
            train_dataset=data,
            processing_class=processor,
            peft_config=lora,
            callbacks=[Timer()],
            consistency_scorer=scorer,
        )
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    steady = times[args.warmup :] or times
    peak = torch.cuda.max_memory_allocated() if on_gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # The mean, not the median: with mining every m steps, the cost a user pays per step is the average.
    print(json.dumps({"variant": variant, "step_s": statistics.mean(steady), "peak_bytes": peak}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model_name_or_path", default=None)
    parser.add_argument("--preset", choices=["tiny", "compute"], default="tiny", help="Model built in code.")
    parser.add_argument(
        "--shapes",
        choices=["janus-pro-1b", "janus-pro-7b"],
        default=None,
        help="Build this model's real architecture with random weights (no download); for a GPU.",
    )
    parser.add_argument("--output_json", default=None)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--num_candidates", type=int, default=3)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--output_dir", default="/tmp/unigame-benchmark")
    parser.add_argument("--mining_rounds", type=int, default=5, help="Interleaved rounds of the throughput runs.")
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=list(VARIANTS),
        default=list(VARIANTS),
        help="Variants to time (plain always).",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="Rounds of all variants in turn; ratios are the median over rounds."
    )
    parser.add_argument("--skip_mining", action="store_true", help="Skip the mining-throughput comparison.")
    parser.add_argument(
        "--mining_sizes",
        type=int,
        nargs="+",
        default=None,
        help="Image sizes (px) of the mining-throughput runs of `generate_images`; the first is the model's own.",
    )
    parser.add_argument("--variant", choices=list(VARIANTS) + ["mining"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.shapes:
        args.preset = args.shapes
    if args.variant == "mining":
        return print(json.dumps(mining_throughput(args)))
    if args.variant:
        return run_variant(args.variant, args)

    def run_in_own_process(variant: str) -> dict:
        command = [sys.executable, __file__, "--variant", variant] + sys.argv[1:]
        out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        if out.returncode:
            sys.exit(f"{variant} failed:\n{out.stderr[-3000:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    variants = ["plain"] + [v for v in args.variants if v != "plain"]
    # one dict per round; the variants run in turn, so a drift in the machine's speed hits all alike
    rounds = [{variant: run_in_own_process(variant) for variant in variants} for _ in range(args.repeats)]
    results = {
        variant: {
            "step_s": statistics.median(r[variant]["step_s"] for r in rounds),
            "peak_bytes": statistics.median(r[variant]["peak_bytes"] for r in rounds),
            "time_ratio": statistics.median(r[variant]["step_s"] / r["plain"]["step_s"] for r in rounds),
            "rounds": [r[variant] for r in rounds],
        }
        for variant in variants
    }
    mining = None if args.skip_mining else run_in_own_process("mining")
    base = results["plain"]
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU ({os.cpu_count()} cores)"
    names = {"tiny": "tiny random Janus", "compute": "compute preset"}
    model_name = args.model_name_or_path or names.get(args.preset, f"{args.preset} shapes, random weights")
    print(
        f"device: {device}; model: {model_name}; batch {args.batch_size}; "
        f"K = {args.num_candidates}; mean of steps {args.warmup + 1}..{args.steps}; median of {args.repeats} round(s)"
    )
    print(f"{'variant':<28} {'step (ms)':>10} {'time ratio':>11} {'peak memory ratio':>18}  description")
    for variant, r in results.items():
        print(
            f"{variant:<28} {1e3 * r['step_s']:>10.1f} {r['time_ratio']:>11.2f} "
            f"{r['peak_bytes'] / base['peak_bytes']:>18.2f}  {VARIANTS[variant]}"
        )
    if "game_m1" in results and "game_no_mining" in results:
        mining_round = results["game_m1"]["step_s"] - results["game_no_mining"]["step_s"]
        print(
            f"mining alone (one round: generate, decode, score, push; m1 - no mining): {1e3 * mining_round:.1f} ms "
            f"= {mining_round / base['step_s']:.2f} plain steps"
        )
    if mining:
        print(
            f"mining throughput (greedy, guidance 3, batch {args.batch_size * args.num_candidates}, image tokens/s): "
            f"transformers' generate {mining['transformers_generate']:.0f}; generate_images "
            f"{mining['generate_images']:.0f} ({mining['generate_images_ratio']:.2f}x); generate_images, compiled "
            f"step {mining['generate_images_compiled']:.0f} ({mining['generate_images_compiled_ratio']:.2f}x; "
            f"compiling took {mining['compile_s']:.0f} s)"
        )
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(
                {"device": device, "model": model_name, "args": vars(args), "variants": results, "mining": mining},
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
