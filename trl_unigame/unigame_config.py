"""Configuration of UniGame training: the game's fields, and `UniGameConfig`, which adds them to `TrainingArguments`."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import cached_property

from transformers import TrainingArguments

from .selection import SELECTION_RULES


UNDERSTANDING_UPDATES = ("mixed", "separate")
GENERATION_ADVERSARIES = ("none", "reinforce")
GENERATION_ADVERSARY_REWARDS = ("gated", "faithful")


@dataclass
class UniGameArguments:
    r"""
    The fields of the UniGame game, shared by [`UniGameConfig`], [`UniGameSFTConfig`] and [`UniGameDPOConfig`].

    Defaults follow the paper where it gives a number, else the authors' code (see `docs/method.md`).

    > Parameters that control the perturber (player C)

    Args:
        perturber_learning_rate (`float`, *optional*, defaults to `5e-3`):
            AdamW learning rate of the perturber (paper 5e-3; authors' code 3e-2).
        perturber_weight_decay (`float`, *optional*, defaults to `0.0`):
            AdamW weight decay of the perturber's weight matrices; its scalars (the eps logit, the gradient gain) and
            biases are never decayed. One optimizer decays: the understanding-site step's, or the generation-side
            adversary's when `adversarial_weight=0`.
        adversarial_weight (`float`, *optional*, defaults to `120.0`):
            `lambda`: weight of the understanding loss that the perturber ascends (authors' code: 120). `0` skips the
            perturber's pass.
        delta_reg_weight (`float`, *optional*, defaults to `0.0`):
            Weight of the mean `||delta||^2` penalty in the perturber's loss.
        tv_reg_weight (`float`, *optional*, defaults to `0.0`):
            Weight of the total-variation penalty over neighbouring visual tokens' perturbations.
        eps_reg_weight (`float`, *optional*, defaults to `0.0`):
            Weight of the `eps^2` penalty.
        perturber_eps_max (`float`, *optional*, defaults to `0.02`):
            Largest per-token L2 norm of the perturbation.
        perturber_eps_init (`float`, *optional*, defaults to `0.01`):
            Initial per-token L2 norm.
        perturber_width (`int`, *optional*):
            Hidden width of the perturber's MLP; defaults to the LLM's hidden size.
        perturber_depth (`int`, *optional*, defaults to `3`):
            Number of linear layers of the perturber's MLP.
        perturber_sites (`list[str]`, *optional*, defaults to `["understanding", "generation"]`):
            Where the perturbation acts.
        perturber_update (`str`, *optional*, defaults to `"exact"`):
            How the perturber's ascent is computed. `"exact"`: U's loss with the perturbation active, an extra
            forward and backward through the model. `"first_order"`: `CE(z + delta) ~ CE(z) + <g, delta>`, with `g`
            the gradient of the clean loss at the visual tokens, taken from the clean backward that U's update needs
            anyway; the perturber's step then costs only its own MLP. Accurate when the perturbation is small.
        perturber_inputs (`str`, *optional*, defaults to `"features"`):
            What the perturber reads per visual token. `"features"`: the token alone (the paper; a perturbation that
            every image shares). `"features_and_gradient"`: the token and U's loss gradient at it (per-token
            normalised), so the perturber learns a sample-specific ascent direction within the same budget. The
            gradient comes from the clean backward with `perturber_update="first_order"` (no extra pass); the exact
            step and `perturbed_weight` take it from a backward to the visual tokens of their own. At the generation
            site, which has no loss while sampling, the gradient channel is zero. `"gradient"`: no learned perturber,
            the baseline it is compared with: each token moves along its normalised gradient by the whole budget
            `perturber_eps_max` (token-space adversarial training with one fast-gradient step; needs
            `adversarial_weight=0` and `perturbed_weight > 0`).
        perturber_budget (`str`, *optional*, defaults to `"absolute"`):
            `"absolute"`: `perturber_eps_max`/`perturber_eps_init` are per-token L2 norms (the paper). `"relative"`:
            they are fractions of each token's own norm, a budget that means the same at every token scale and that
            a bf16 model does not round away.
        perturber_generation_budget (`str`, *optional*):
            The generation site's budget mode; `None` uses `perturber_budget`.
        perturber_generation_eps_max (`float`, *optional*):
            The generation site's largest budget; `None` uses `perturber_eps_max`. The two sites can differ by an
            order of magnitude in token norm, so one absolute budget rarely suits both.
        perturber_generation_row_scales (`list[float]`, *optional*):
            Factors on the generation site's budget for the first rows of the generated image's token grid (`[4.0]`:
            four times the budget for the tokens of the first row; the rows after the list keep factor 1). The first
            rows of a raster-ordered drawing decide where it starts on the canvas, so a larger budget there lets the
            perturbation move the drawing, the budget elsewhere keeping it faithful. `None`: one budget for every
            row. Not in the paper.

    > Parameters that control mining of decoded hard samples

    Args:
        mining_interval (`int`, *optional*, defaults to `1`):
            `m`: mine every `m` optimizer steps (authors' code: 1), once per step: on the last micro-batch of the
            accumulation window, from that micro-batch's rows. `0` disables mining.
        num_candidates (`int`, *optional*, defaults to `3`):
            `K`: images generated per sample.
        candidates_kept_per_sample (`int`, *optional*, defaults to `1`):
            `k`: most candidates kept per source sample.
        consistency_model (`str` or `None`, *optional*, defaults to `"openai/clip-vit-base-patch16"`):
            CLIP model (Hub id or folder) that scores prompt-image consistency. `None` turns the filter off.
        consistency_threshold (`float`, *optional*, defaults to `0.3`):
            `tau_clip`: consistency threshold.
        consistency_weight (`float`, *optional*, defaults to `0.2`):
            `w_clip`: weight of `max(0, tau_clip - s)` in the hardness `H`.
        hardness_quantile (`float`, *optional*, defaults to `0.6`):
            `q`: only candidates with `H` at or above this quantile of the mining batch are hard (paper 0.6; authors'
            code 0.8).
        selection (`str`, *optional*, defaults to `"paper"`):
            `"paper"`: keep `s >= tau_clip` and `H >=` quantile; `"reference"`: the authors' code, `H >=` quantile
            or `s <= tau_clip`.
        generation_guidance_scale (`float`, *optional*):
            Classifier-free guidance scale when generating candidates. `None` takes the model's own, the
            `guidance_scale` of its `generation_config` (the shipped digits model: 3.0), or 5.0 when it sets none.
        generation_temperature (`float`, *optional*):
            Sampling temperature of image tokens; `0` is greedy. `None` takes the model's own, the `temperature` of
            its `generation_config` (the shipped digits model: 0.7), or 1.0 when it sets none.
        mining_image_size (`int`, *optional*):
            Side in pixels of the generated candidates: smaller than the model's own generation size, the generator
            samples a smaller token grid (Janus-Pro: `256` is 16 x 16 = 256 tokens instead of 24 x 24 = 576 at 384
            px) and the images are resized for the understanding side. Mining's cost falls with the token count; the
            candidates' quality falls too (see docs/benchmarks.md). `None` generates at the model's own size.
        mining_compile (`bool`, *optional*, defaults to `False`):
            Compile the one-token step of candidate generation with `torch.compile` (on a static KV cache, so its
            shapes never change). Worth it on a GPU, where each step is a short, launch-bound run of kernels; the
            first mining round pays the compilation (tens of seconds) and later rounds reuse it. Settings come from
            `mining_compile_kwargs`.
        mining_compile_kwargs (`dict` or `str`, *optional*):
            Keyword arguments of `transformers.CompileConfig` for `mining_compile` (`backend`, `mode`, `fullgraph`,
            `dynamic`, `options`), as a dict or its JSON. `None` takes transformers' defaults: `"inductor"` with
            `mode="reduce-overhead"` (CUDA graphs on a GPU).
        generation_check_interval (`int`, *optional*, defaults to `0`):
            Every this many optimizer steps, generate one image per sample with the perturber off and log its mean
            consistency score (`unigame/clean_generation_consistency`): is fine-tuning the understanding player
            degrading the shared generator that mining relies on? Most useful with a task-specific judge as the
            consistency scorer; needs a scorer (a `consistency_scorer` or `consistency_model`), with or without mining.
            Runs once per optimizer step, on the last micro-batch of the accumulation window. `0` never checks.
        prompt_column (`str`, *optional*, defaults to `"caption"`):
            Dataset column used as the generation prompt when present; otherwise the question is used.

    > Parameters that control the generation-side adversary

    Args:
        generation_adversary (`str`, *optional*, defaults to `"none"`):
            How the perturber learns at the generation site. `"none"` (the paper): it learns only from U's loss at the
            understanding site and acts at the generation site as it is. `"reinforce"`: once per mining round, the
            perturber also takes a score-function (REINFORCE) step on that round's own candidates, rewarded by their
            hardness `H` for U among those whose consistency reaches `consistency_threshold` (faithful; see
            `generation_adversary_reward`), and the loss is `-mean(advantage * log p(candidate's image tokens))`, the
            log-probability from one teacher-forced pass with the perturbation active, the same guidance and
            temperature. No gradient goes through sampling or the VQ decoder, and only the perturber's parameters
            get one. Needs mining, a consistency scorer, `num_candidates >= 2`, a positive
            `generation_temperature` and the perturber's generation site. Not in the paper.
        generation_adversary_learning_rate (`float`, *optional*, defaults to `5e-3`):
            Learning rate of the generation-side adversary's own AdamW over the perturber's parameters (its moments
            are kept apart from those of the understanding-site step; it decays the weights only when that step never
            runs).
        generation_adversary_penalty (`float`, *optional*, defaults to `-1.0`):
            With `generation_adversary_reward="gated"`, the reward of a candidate below `consistency_threshold`
            (unfaithful). At most 0: the hardness of a faithful
            candidate is a cross-entropy (at least 0), so an unfaithful candidate never earns more than a faithful
            one; below 0 it earns less than the easiest faithful one, which steers the perturber away from breaking
            the drawing.
        generation_adversary_reward (`str`, *optional*, defaults to `"faithful"`):
            What the generation-side adversary rewards. `"gated"`: every candidate takes part, a faithful one earns
            its hardness `H`, an unfaithful one `generation_adversary_penalty`, and the baseline is the mean reward of
            the prompt's candidates; the step then mostly separates faithful from unfaithful drawings. `"faithful"`:
            only faithful candidates take part, each with its hardness minus the mean hardness of the faithful
            candidates of the same prompt (a prompt with fewer than two faithful candidates adds no gradient, a round
            where no candidate takes part on any process makes no step, and `generation_adversary_penalty` is not
            used); the step moves probability towards the harder of the drawings the consistency scorer accepts.
        generation_adversary_normalize (`bool`, *optional*, defaults to `True`):
            Divide the advantages of a round by their standard deviation (over the round's candidates that take
            part, on each process), so the step's size does not follow the scale of the losses.
        generation_adversary_chunk_size (`int`, *optional*, defaults to `4`):
            Candidates per teacher-forced pass of the generation-side step: the passes run one after the other, each
            adding its gradient before the next, so the step's memory is one chunk's activations and full-vocabulary
            scores (each layer's input only under `gradient_checkpointing`, which the pass follows). Lower it when
            the step runs out of memory; the gradient is the same.

    > Parameters that control the buffer and the understanding update (player U)

    Args:
        buffer_weight (`float`, *optional*, defaults to `0.5`):
            `beta`: weight of the loss on buffer samples (paper 0.5).
        buffer_max_loss_ratio (`float`, *optional*):
            Largest ratio of the weighted buffer loss to the clean loss in U's objective: when `beta * CE(buffer)`
            would exceed `buffer_max_loss_ratio * CE(clean)`, the buffer's weight is lowered for that step to meet it
            (the buffer then takes at most `r / (1 + r)` of the objective). Decoded hard samples that U cannot fit can
            otherwise take half its gradient. `None` (default, the paper) keeps `beta` as it is. Not in the paper.
        generation_loss_weight (`float`, *optional*, defaults to `0.0`):
            Weight of the model's image-generation loss (next image token) on the clean batch's (prompt, image)
            pairs, added to U's loss: fine-tuning the shared LLM for understanding can degrade the generator that
            mining relies on, and this term keeps it. Not in the paper; `0` computes nothing.
        generation_loss_targets (`str`, *optional*, defaults to `"batch"`):
            What `generation_loss_weight`'s loss trains on. `"batch"`: the clean batch's (prompt, image) pairs, which
            teaches the generator the fine-tuning images (and only them). `"anchors"`: the model's own drawings of the
            prompts of the first `generation_anchors` training rows, drawn as their batches come, with its adapter
            and the perturber off, meant to hold the generator where it started, what it could draw beyond the
            fine-tuning data included. Needs a PEFT adapter on the model (a resumed run draws again, from the model
            as loaded). Not in the paper.
        generation_anchors (`int`, *optional*, defaults to `64`):
            How many drawings `generation_loss_targets="anchors"` holds (one per training row, so a prompt that rows
            share is drawn as often); each micro-batch's generation loss takes as many of them as the clean batch has
            rows, drawn at random.
        perturbed_weight (`float`, *optional*, defaults to `0.0`):
            Weight of U's loss on the clean batch with the perturber's current perturbation active at the
            understanding site: training on embedding-space adversarial samples. Not part of the paper's method
            (its ablation row "adversarial embedding only" is `perturbed_weight > 0` with `mining_interval=0`); `0`
            runs no such pass.
        understanding_update (`str`, *optional*, defaults to `"mixed"`):
            `"mixed"`: one step on `CE(clean) + beta * CE(buffer)` (paper); `"separate"`: after the clean step, a second
            optimizer step on `beta * CE(buffer)` (the authors' code and order; their weights are 1 and 1, so set
            `buffer_weight=1.0` to match them). `buffer_max_loss_ratio` applies to `"mixed"` only.
        one_pass_update (`bool`, *optional*, defaults to `True`):
            With `understanding_update="mixed"`, run the clean and buffer rows as one batch (one forward and one
            backward, each row weighted) instead of two passes; the update is the same up to rounding. Applies to
            [`UniGameTrainer`]; the TRL hosts always run two passes.
        buffer_capacity (`int`, *optional*, defaults to `50`):
            Hard samples kept (paper 50; authors' code 4096).
        buffer_batch_size (`int`, *optional*, defaults to `8`):
            Hard samples drawn per training micro-batch.
        buffer_temperature (`float`, *optional*, defaults to `2.0`):
            Temperature `T` of the rank softmax used to sample the buffer.
        buffer_pop (`bool`, *optional*, defaults to `False`):
            Remove sampled entries from the buffer (authors' code: `True`).
        buffer_max_age (`int`, *optional*):
            Entries mined more than this many optimizer steps ago leave the buffer (checked after each mining round);
            `None` keeps them until displaced by harder ones or popped. Not in the paper.

    > Parameters that control generative evaluation

    Args:
        predict_with_generate (`bool`, *optional*, defaults to `False`):
            On `evaluate()`, also generate greedy answers to the evaluation set (perturber off) and report their VQA
            accuracy as `eval_clean/vqa_accuracy` (see [`~evaluation.UniGameEvaluator`]).
        eval_attack_eps (`float`, *optional*):
            With `predict_with_generate`, also report the accuracy under a PGD attack of this per-token L2 budget at
            the understanding site, as `eval_attack_eps{eps}/vqa_accuracy` (read like the perturber's budget: a
            fraction of each token's norm, `eval_attack_rel{eps}/...`, when that budget is relative). `None` runs no
            attack.
    """

    perturber_learning_rate: float = field(default=5e-3, metadata={"help": "AdamW learning rate of the perturber."})
    perturber_weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay of the perturber's weight matrices (not its scalars)."}
    )
    adversarial_weight: float = field(
        default=120.0, metadata={"help": "lambda: weight of the understanding loss the perturber ascends."}
    )
    delta_reg_weight: float = field(default=0.0, metadata={"help": "Weight of the mean ||delta||^2 penalty."})
    tv_reg_weight: float = field(default=0.0, metadata={"help": "Weight of the total-variation penalty over tokens."})
    eps_reg_weight: float = field(default=0.0, metadata={"help": "Weight of the eps^2 penalty."})
    perturber_eps_max: float = field(default=0.02, metadata={"help": "Largest per-token L2 norm of the perturbation."})
    perturber_eps_init: float = field(default=0.01, metadata={"help": "Initial per-token L2 norm."})
    perturber_width: int | None = field(
        default=None, metadata={"help": "Hidden width of the perturber MLP (default: the LLM hidden size)."}
    )
    perturber_depth: int = field(default=3, metadata={"help": "Linear layers in the perturber MLP."})
    perturber_sites: list[str] = field(
        default_factory=lambda: ["understanding", "generation"],
        metadata={"help": "Where the perturbation acts: understanding, generation or both."},
    )
    perturber_update: str = field(
        default="exact",
        metadata={
            "help": "exact: a perturbed forward and backward; first_order: <clean gradient, delta>, no extra pass."
        },
    )
    perturber_inputs: str = field(
        default="features",
        metadata={
            "help": "features: the perturber reads each visual token; features_and_gradient: also U's gradient; "
            "gradient: no learned perturber, one fast-gradient step of the whole budget."
        },
    )
    perturber_budget: str = field(
        default="absolute", metadata={"help": "absolute: eps is a per-token L2 norm; relative: a fraction of it."}
    )
    perturber_generation_budget: str | None = field(
        default=None, metadata={"help": "The generation site's budget mode (None: perturber_budget)."}
    )
    perturber_generation_eps_max: float | None = field(
        default=None, metadata={"help": "The generation site's largest budget (None: perturber_eps_max)."}
    )
    perturber_generation_row_scales: list[float] | None = field(
        default=None,
        metadata={
            "help": "Factors on the generation site's budget for the first rows of the generated token grid, e.g. 4.0 "
            "(four times the budget on the first row); None: the same budget everywhere."
        },
    )
    mining_interval: int = field(
        default=1, metadata={"help": "m: mine every m optimizer steps (once per step); 0 disables mining."}
    )
    num_candidates: int = field(default=3, metadata={"help": "K: candidate images generated per sample."})
    candidates_kept_per_sample: int = field(default=1, metadata={"help": "k: most candidates kept per sample."})
    consistency_model: str | None = field(
        default="openai/clip-vit-base-patch16",
        metadata={"help": "CLIP model (Hub id or folder) for prompt-image consistency; None disables the filter."},
    )
    consistency_threshold: float = field(default=0.30, metadata={"help": "tau_clip: consistency threshold."})
    consistency_weight: float = field(default=0.2, metadata={"help": "w_clip: weight of the consistency shortfall."})
    hardness_quantile: float = field(default=0.6, metadata={"help": "q: hardness quantile a hard candidate reaches."})
    selection: str = field(
        default="paper", metadata={"help": "Selection rule: paper (AND) or reference (the authors' OR)."}
    )
    generation_guidance_scale: float | None = field(
        default=None,
        metadata={"help": "Classifier-free guidance scale (None: the model's generation_config, else 5)."},
    )
    generation_temperature: float | None = field(
        default=None,
        metadata={"help": "Image-token sampling temperature (None: the model's generation_config, else 1)."},
    )
    mining_image_size: int | None = field(
        default=None,
        metadata={"help": "Side (px) of generated candidates, on a smaller token grid; None: the model's own size."},
    )
    mining_compile: bool = field(
        default=False, metadata={"help": "Compile the one-token step of candidate generation with torch.compile."}
    )
    mining_compile_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "transformers.CompileConfig arguments for mining_compile (dict or JSON); None: defaults."},
    )
    generation_check_interval: int = field(
        default=0,
        metadata={"help": "Every N steps, score one clean (unperturbed) generation per sample; 0 = never."},
    )
    prompt_column: str = field(
        default="caption", metadata={"help": "Column used as generation prompt when present, else the question."}
    )
    generation_adversary: str = field(
        default="none",
        metadata={
            "help": "none: the perturber learns only at the understanding site; reinforce: also a REINFORCE step on "
            "each mining round's candidates (rewarded by their hardness among the faithful ones)."
        },
    )
    generation_adversary_learning_rate: float = field(
        default=5e-3, metadata={"help": "AdamW learning rate of the generation-side adversary's step."}
    )
    generation_adversary_penalty: float = field(
        default=-1.0, metadata={"help": "Reward of an unfaithful candidate (consistency below the threshold); <= 0."}
    )
    generation_adversary_reward: str = field(
        default="faithful",
        metadata={
            "help": "gated: hardness if faithful, else the penalty, against the prompt's mean; faithful: faithful "
            "candidates only, hardness against the mean of the prompt's faithful candidates."
        },
    )
    generation_adversary_normalize: bool = field(
        default=True, metadata={"help": "Divide a round's advantages by their standard deviation."}
    )
    generation_adversary_chunk_size: int = field(
        default=4,
        metadata={"help": "Candidates per teacher-forced pass of the generation-side step (memory, not the result)."},
    )
    buffer_weight: float = field(default=0.5, metadata={"help": "beta: weight of the buffer loss."})
    buffer_max_loss_ratio: float | None = field(
        default=None,
        metadata={"help": "Cap on beta * buffer loss / clean loss; beta is lowered to meet it (None: no cap)."},
    )
    generation_loss_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the image-generation loss on the clean batch's (prompt, image) pairs."},
    )
    generation_loss_targets: str = field(
        default="batch",
        metadata={
            "help": "What the generation loss trains on: batch (the clean batch's pairs) or anchors (the model's own "
            "drawings of training prompts, drawn with its adapter off)."
        },
    )
    generation_anchors: int = field(
        default=64, metadata={"help": "With generation_loss_targets='anchors': how many drawings to draw."}
    )
    perturbed_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the loss on the batch with the perturbation active (embedding-space samples)."},
    )
    understanding_update: str = field(
        default="mixed", metadata={"help": "mixed: one step on clean + beta * buffer; separate: two steps."}
    )
    one_pass_update: bool = field(
        default=True, metadata={"help": "mixed update: clean and buffer rows in one forward and backward."}
    )
    buffer_capacity: int = field(default=50, metadata={"help": "Hard samples kept in the buffer."})
    buffer_batch_size: int = field(default=8, metadata={"help": "Hard samples drawn per micro-batch."})
    buffer_temperature: float = field(default=2.0, metadata={"help": "T: temperature of the rank softmax."})
    buffer_pop: bool = field(default=False, metadata={"help": "Remove sampled entries from the buffer."})
    buffer_max_age: int | None = field(
        default=None, metadata={"help": "Entries mined more than this many optimizer steps ago leave the buffer."}
    )
    predict_with_generate: bool = field(
        default=False,
        metadata={"help": "On evaluate(), also report the VQA accuracy of generated answers (perturber off)."},
    )
    eval_attack_eps: float | None = field(
        default=None,
        metadata={"help": "With predict_with_generate, also report accuracy under a PGD attack of this budget."},
    )

    def _validate_unigame(self) -> None:
        def check(name, ok, allowed):
            if not ok:
                raise ValueError(f"`{name}` must be {allowed}, got {getattr(self, name)!r}.")

        check("perturber_learning_rate", self.perturber_learning_rate > 0, "> 0")
        check("perturber_weight_decay", self.perturber_weight_decay >= 0, ">= 0")
        check("adversarial_weight", self.adversarial_weight >= 0, ">= 0")
        for name in (
            "delta_reg_weight",
            "tv_reg_weight",
            "eps_reg_weight",
            "consistency_weight",
            "buffer_weight",
            "perturbed_weight",
        ):
            check(name, getattr(self, name) >= 0, ">= 0")
        check("perturber_eps_max", self.perturber_eps_max > 0, "> 0")
        check("perturber_eps_init", 0 < self.perturber_eps_init < self.perturber_eps_max, "in (0, perturber_eps_max)")
        check("perturber_width", self.perturber_width is None or self.perturber_width > 0, "None or > 0")
        check("perturber_depth", self.perturber_depth >= 1, ">= 1")
        check(
            "perturber_sites",
            bool(self.perturber_sites) and set(self.perturber_sites) <= {"understanding", "generation"},
            "a non-empty subset of ['understanding', 'generation']",
        )
        check("perturber_update", self.perturber_update in ("exact", "first_order"), "'exact' or 'first_order'")
        check("perturber_budget", self.perturber_budget in ("absolute", "relative"), "'absolute' or 'relative'")
        check(
            "perturber_inputs",
            self.perturber_inputs in ("features", "features_and_gradient", "gradient"),
            "'features', 'features_and_gradient' or 'gradient'",
        )
        check(
            "perturber_generation_budget",
            self.perturber_generation_budget in (None, "absolute", "relative"),
            "None, 'absolute' or 'relative'",
        )
        check(
            "perturber_generation_eps_max",
            self.perturber_generation_eps_max is None or self.perturber_generation_eps_max > 0,
            "None or > 0",
        )
        check(
            "perturber_generation_row_scales",
            self.perturber_generation_row_scales is None
            or (
                isinstance(self.perturber_generation_row_scales, (list, tuple))
                and len(self.perturber_generation_row_scales) > 0
                and all(
                    isinstance(v, (int, float)) and math.isfinite(v) and v > 0
                    for v in self.perturber_generation_row_scales
                )
            ),
            "None or a non-empty list of numbers > 0",
        )
        check("generation_check_interval", self.generation_check_interval >= 0, ">= 0 (0 turns the check off)")
        check("mining_interval", self.mining_interval >= 0, ">= 0 (0 disables mining)")
        check("mining_image_size", self.mining_image_size is None or self.mining_image_size > 0, "None or > 0")
        check("num_candidates", self.num_candidates >= 1, ">= 1")
        check(
            "candidates_kept_per_sample",
            1 <= self.candidates_kept_per_sample <= self.num_candidates,
            f"in [1, num_candidates={self.num_candidates}]",
        )
        check("consistency_threshold", -1 <= self.consistency_threshold <= 1, "in [-1, 1] (a cosine similarity)")
        check("hardness_quantile", 0 <= self.hardness_quantile <= 1, "in [0, 1]")
        check("selection", self.selection in SELECTION_RULES, f"one of {list(SELECTION_RULES)}")
        check(
            "generation_guidance_scale",
            self.generation_guidance_scale is None or self.generation_guidance_scale >= 1,
            "None (the model's) or >= 1",
        )
        check(
            "generation_temperature",
            self.generation_temperature is None or self.generation_temperature >= 0,
            "None (the model's) or >= 0 (0 is greedy)",
        )
        check(
            "understanding_update",
            self.understanding_update in UNDERSTANDING_UPDATES,
            f"one of {list(UNDERSTANDING_UPDATES)}",
        )
        check("generation_loss_targets", self.generation_loss_targets in ("batch", "anchors"), "'batch' or 'anchors'")
        check("generation_anchors", self.generation_anchors >= 1, ">= 1")
        if self.generation_loss_targets == "anchors" and not self.generation_loss_weight:
            raise ValueError(
                "`generation_loss_targets='anchors'` chooses what the generation loss trains on, but "
                "`generation_loss_weight` is 0, so there is no such loss: set `generation_loss_weight` (1.0 holds the "
                "generator as firmly as the batch's pairs would), or leave `generation_loss_targets='batch'`."
            )
        check("buffer_capacity", self.buffer_capacity >= 1, ">= 1")
        check("buffer_batch_size", self.buffer_batch_size >= 1, ">= 1")
        check("buffer_temperature", self.buffer_temperature > 0, "> 0")
        check("eval_attack_eps", self.eval_attack_eps is None or self.eval_attack_eps > 0, "None or > 0")
        check(
            "buffer_max_loss_ratio",
            self.buffer_max_loss_ratio is None or self.buffer_max_loss_ratio > 0,
            "None or > 0",
        )
        check("buffer_max_age", self.buffer_max_age is None or self.buffer_max_age >= 0, "None or >= 0")
        self._validate_generation_adversary()
        if self.perturber_inputs == "gradient" and (self.adversarial_weight or not self.perturbed_weight):
            raise ValueError(
                "`perturber_inputs='gradient'` is token-space adversarial training with a fixed fast-gradient step: "
                f"nothing learns (got adversarial_weight={self.adversarial_weight}) and the model must train on the "
                f"perturbed tokens (got perturbed_weight={self.perturbed_weight}). Set `adversarial_weight=0` and "
                "`perturbed_weight > 0`, or use `perturber_inputs='features_and_gradient'` for a perturber that learns."
            )
        if self.buffer_max_loss_ratio is not None and self.understanding_update == "separate":
            raise ValueError(
                "`buffer_max_loss_ratio` caps the buffer's share of the mixed objective, but "
                "`understanding_update='separate'` steps on the buffer's loss alone: set `buffer_max_loss_ratio=None`, "
                "or use `understanding_update='mixed'`."
            )
        if isinstance(self.consistency_model, str) and self.consistency_model.lower() in ("", "none"):
            self.consistency_model = None
        if isinstance(self.mining_compile_kwargs, str):
            try:
                self.mining_compile_kwargs = json.loads(self.mining_compile_kwargs)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f'`mining_compile_kwargs` must be a dict or its JSON, e.g. \'{{"mode": "default"}}\': {error}'
                ) from None
        if self.mining_compile_kwargs is not None:
            self.mining_compile_config()  # an unknown argument fails here, not in the first mining round

    def _validate_generation_adversary(self) -> None:
        if self.generation_adversary not in GENERATION_ADVERSARIES:
            raise ValueError(
                f"`generation_adversary` must be one of {list(GENERATION_ADVERSARIES)}, got "
                f"{self.generation_adversary!r}."
            )
        if self.generation_adversary_reward not in GENERATION_ADVERSARY_REWARDS:
            raise ValueError(
                f"`generation_adversary_reward` must be one of {list(GENERATION_ADVERSARY_REWARDS)}, got "
                f"{self.generation_adversary_reward!r}."
            )
        if not self.generation_adversary_learning_rate > 0:
            raise ValueError(
                f"`generation_adversary_learning_rate` must be > 0, got {self.generation_adversary_learning_rate!r}."
            )
        if not (math.isfinite(self.generation_adversary_penalty) and self.generation_adversary_penalty <= 0):
            raise ValueError(
                "`generation_adversary_penalty` must be a finite number <= 0 (an unfaithful candidate must not earn "
                f"more than a faithful one), got {self.generation_adversary_penalty!r}."
            )
        if not (isinstance(self.generation_adversary_chunk_size, int) and self.generation_adversary_chunk_size >= 1):
            raise ValueError(
                f"`generation_adversary_chunk_size` must be an integer >= 1, got {self.generation_adversary_chunk_size!r}."
            )
        if self.generation_adversary == "none":
            return
        needs = [
            (self.mining_interval == 0, "mining (its rounds are its data): set `mining_interval` >= 1"),
            (
                self.num_candidates < 2,
                "`num_candidates` >= 2 (the baseline is the mean reward of a prompt's candidates: with one, every "
                "advantage is 0)",
            ),
            (
                self.generation_temperature == 0,
                "a positive `generation_temperature` (greedy tokens have no log-probability to follow)",
            ),
            (
                "generation" not in self.perturber_sites,
                "the perturber's generation site: add 'generation' to `perturber_sites`",
            ),
        ]
        missing = [what for failed, what in needs if failed]
        if missing:
            raise ValueError(
                f"`generation_adversary={self.generation_adversary!r}` needs {'; and '.join(missing)}. Or set "
                "`generation_adversary='none'`."
            )

    def mining_compile_config(self):
        """The `transformers.CompileConfig` for candidate generation, or `None` when `mining_compile` is off.

        Raises:
            ValueError: when `mining_compile_kwargs` holds an argument `CompileConfig` does not take.
        """
        from transformers import CompileConfig

        kwargs = dict(self.mining_compile_kwargs or {})
        known = set(CompileConfig().to_dict())
        if unknown := sorted(set(kwargs) - known):
            raise ValueError(
                f"`mining_compile_kwargs` has {unknown}, which `transformers.CompileConfig` does not take; use "
                f"{sorted(known)}."
            )
        return CompileConfig(**kwargs) if self.mining_compile else None


def _setup_devices(self):
    """`TrainingArguments._setup_devices`, then DeepSpeed on a CPU made to span its processes (see
    `game.sharding.complete_deepspeed_on_cpu`): before the DeepSpeed config's batch sizes are derived from the world
    size. Assigned as a `cached_property` to each UniGame config class."""
    from .game.sharding import complete_deepspeed_on_cpu

    device = TrainingArguments._setup_devices.func(self)
    complete_deepspeed_on_cpu(self.distributed_state)
    return device


@dataclass
class UniGameConfig(TrainingArguments, UniGameArguments):
    r"""
    Configuration class for the [`UniGameTrainer`]: every field of `transformers.TrainingArguments`, plus the fields
    of [`UniGameArguments`] that control the game.

    Only the parameters specific to UniGame or whose defaults differ from `TrainingArguments` are listed here; see
    [`UniGameArguments`] for the game's fields.

    Args:
        learning_rate (`float`, *optional*, defaults to `2e-5`):
            Learning rate of the understanding player (paper 2e-5; authors' code 3e-6).
        remove_unused_columns (`bool`, *optional*, defaults to `False`):
            Kept `False`: the collator needs the image and text columns.
        logging_steps (`float`, *optional*, defaults to `10`):
            Log every `logging_steps` optimizer steps.
        dataloader_pin_memory (`bool`, *optional*, defaults to `True`):
            Pin the data loader's memory; turned off on a machine with no accelerator (as `use_cpu=True` turns it off),
            where pinning does nothing and torch warns about it.
    """

    learning_rate: float = field(default=2e-5, metadata={"help": "Learning rate of the understanding player."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Kept False: the collator needs the image and text columns."}
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every logging_steps optimizer steps."})

    _setup_devices = cached_property(_setup_devices)

    def __post_init__(self):
        super().__post_init__()
        if self.dataloader_pin_memory and not _accelerator_available():
            self.dataloader_pin_memory = False  # nothing to pin for; torch's data loader would warn
        self._validate_unigame()


def _accelerator_available() -> bool:
    """Whether torch sees an accelerator (CUDA, XPU, MPS, ...): pinned memory only helps copies to one."""
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return accelerator.is_available()
    return torch.cuda.is_available()
