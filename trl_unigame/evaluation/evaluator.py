"""`UniGameEvaluator`: accuracy, robustness and consistency of a unified model on a VQA dataset, as one flat dict."""

from __future__ import annotations

import contextlib
import hashlib
from collections import Counter
from dataclasses import fields
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..interfaces import VisualTokenInterface, get_interface
from ..metrics import load_module
from ..perturber import Perturber, PerturberConfig
from .attacks import ATTACK_BUDGETS, perturbation_at, pgd_attack
from .corruptions import corrupt_image, parse_corruptions
from .similarity import as_image_similarity


#: Default attack budget: the perturber's largest per-token L2 norm (`PerturberConfig.eps_max`).
DEFAULT_ATTACK_EPS = next(f.default for f in fields(PerturberConfig) if f.name == "eps_max")
#: Default question whose answer is the model's caption of a real image (the reverse consistency).
DEFAULT_CAPTION_QUESTION = "Describe the image in one sentence."
# Offset of the reverse round trip's seed from the round trip's.
REVERSE_SEED = 1_000_003


def reference_answers(value) -> list[str]:
    """A row's reference answers as a list of strings: a string, a list of strings, or VQAv2's list of
    `{"answer": ...}` dicts."""
    if isinstance(value, str) or not isinstance(value, (list, tuple)):
        return [str(value)]
    answers = [a["answer"] if isinstance(a, dict) else a for a in value]
    if not answers:
        raise ValueError("A row has an empty list of reference answers.")
    return [str(a) for a in answers]


def majority_answer(answers: list[str]) -> str:
    """The most frequent answer (the first one among ties): the target the attack pushes the model away from."""
    return Counter(answers).most_common(1)[0][0]


def _image_id(image) -> str:
    pixels = np.asarray(image.convert("RGB"))
    return hashlib.md5(pixels.tobytes() + str(pixels.shape).encode()).hexdigest()


class UniGameEvaluator:
    r"""
    Evaluates a unified multimodal model (plain or PEFT/LoRA) on a VQA dataset: accuracy of its greedy answers on
    clean images, under a white-box attack at the shared visual-token interface, under a trained perturber, on
    corrupted images, and on images it generated itself (round-trip consistency); and, the other way round, how close
    its drawing of its own caption of a real image comes to that image (reverse consistency).

    Every condition answers the same rows in batches; answers are scored with the shipped `vqa_accuracy` metric (and
    `group_accuracy` when the dataset has groups). [`~UniGameEvaluator.evaluate`] returns one flat dict:

    - `clean/vqa_accuracy` (and `clean/acc`, `clean/q_acc`, `clean/i_acc`, `clean/g_acc` with a group column);
    - `attack_eps{eps}/vqa_accuracy` (`attack_rel{eps}/...` with `attack_budget="relative"`) for each budget;
    - `perturber/vqa_accuracy` when a perturber is given;
    - `corrupt_{name}_{severity}/vqa_accuracy` for each corruption;
    - `consistency/vqa_accuracy` (and `consistency/judge_score` with a judge) when `consistency=True`;
    - `reverse_consistency/similarity` (and `reverse_consistency/caption_accuracy` with a caption column) when
      `reverse_consistency=True`.

    Args:
        model (`torch.nn.Module`):
            A unified model with a known visual-token interface (see [`get_interface`]), plain or PEFT-wrapped.
        processor (`transformers.ProcessorMixin`):
            The model's processor.
        batch_size (`int`, *optional*, defaults to `32`):
            Rows answered (and attacked) together.
        max_new_tokens (`int`, *optional*, defaults to `10`):
            Longest answer generated (VQA answers are a few words).
        attack_eps (`float` or `list[float]`, *optional*, defaults to `0.02`):
            Budget(s) of the PGD attack; `None` or `[]` runs no attack. The default is the perturber's `eps_max`.
        attack_budget (`str`, *optional*, defaults to `"absolute"`):
            `"absolute"`: each token's perturbation has L2 norm at most `eps`; `"relative"`: at most `eps * ||z||`,
            `z` the clean token.
        attack_steps (`int`, *optional*, defaults to `5`):
            PGD steps; each costs one forward and backward pass of the batch.
        attack_step_size (`float`, *optional*):
            PGD step as a fraction of the budget; defaults to `2.5 / attack_steps`.
        perturber ([`Perturber`] or `str`, *optional*):
            A trained perturber, or its folder / Hub id (loaded with [`Perturber.from_pretrained`]); answers are then
            also generated with it active (and with it off for every other condition). A detached perturber is
            attached to `model` for the run and detached after; an attached one is taken as attached to `model`.
        corruptions (`list[str]`, *optional*):
            Image corruptions as `"name_severity"` (`"noise_3"`) or `"name"` (severities 1, 3 and 5), names among
            `noise`, `blur`, `jpeg`, `contrast`.
        consistency (`bool`, *optional*, defaults to `False`):
            Round trip for rows with a caption: the model generates an image from the caption, then answers the
            row's question about its own image.
        judge (`Callable`, *optional*):
            `(images, captions) -> scores` (images as `[0, 1]` tensors `(B, 3, H, W)`), e.g. a
            [`CLIPConsistencyScorer`]; its mean over the generated images is `consistency/judge_score`.
        reverse_consistency (`bool`, *optional*, defaults to `False`):
            The other way round, for every row: the model captions the real image (its answer to `caption_question`),
            draws its own caption, and the drawing is compared with the real image by `image_similarity` (mean:
            `reverse_consistency/similarity`). With a caption column, its caption is also scored against the row's
            (normalised exact match, `reverse_consistency/caption_accuracy`).
        image_similarity (`Callable`, *optional*):
            `(generated, real) -> scores` (one per pair; images as `[0, 1]` tensors `(B, 3, H, W)` or PIL), required
            with `reverse_consistency=True`. A [`DigitJudge`] scores 1 when it reads the same digit and colour in
            both ([`JudgeAgreement`]); a [`CLIPConsistencyScorer`] gives the cosine of the CLIP image embeddings
            ([`CLIPImageSimilarity`]).
        caption_question (`str` or `list[str]`, *optional*, defaults to `"Describe the image in one sentence."`):
            The question whose answer is the model's caption; with several questions, their answers fill
            `caption_template` (e.g. a model that can name a digit and its colour but not caption:
            `["What color is the digit?", "What digit is this?"]` with `"a {0} {1}"`).
        caption_template (`str`, *optional*):
            `str.format` template of the caption, `{0}` the answer to the first question, `{1}` the second...;
            without it, the answers joined by spaces.
        caption_max_new_tokens (`int`, *optional*, defaults to `32`):
            Longest answer to each caption question.
        generation_guidance_scale (`float`, *optional*):
            Classifier-free guidance of the round trip's image generation; `None` takes the model's
            (`generation_config.guidance_scale`, else 5.0).
        generation_temperature (`float`, *optional*):
            Sampling temperature of the round trip's image tokens (`0` is greedy); `None` takes the model's
            (`generation_config.temperature`, else 1.0).
        seed (`int`, *optional*, defaults to `0`):
            Seed of the corruptions' noise and of image generation.
        show_progress (`bool`, *optional*, defaults to `True`):
            Show a progress bar over batches.
        interface ([`VisualTokenInterface`], *optional*):
            The model's interface; found with [`get_interface`] when not given.
        question_column, image_column, caption_column, group_column, question_id_column, image_id_column (`str`):
            Column names; defaults `question`, `image`, `caption`, `group_id`, `question_id`, `image_id`. The
            reference answers are read from `answers` (a list, e.g. VQAv2's 10 annotators) or `answer`. Without a
            question id column, a question is identified by its text; without an image id column, an image by its
            pixels.

    Example:

    ```python
    >>> from trl_unigame.evaluation import UniGameEvaluator
    >>> evaluator = UniGameEvaluator(model, processor, attack_eps=[0.02, 0.05], corruptions=["noise_3"])
    >>> evaluator.evaluate(dataset)
    {'clean/vqa_accuracy': 0.81, 'attack_eps0.02/vqa_accuracy': 0.64, 'attack_eps0.05/vqa_accuracy': 0.42, ...}
    ```
    """

    def __init__(
        self,
        model: nn.Module,
        processor,
        batch_size: int = 32,
        max_new_tokens: int = 10,
        attack_eps: float | list[float] | None = DEFAULT_ATTACK_EPS,
        attack_budget: str = "absolute",
        attack_steps: int = 5,
        attack_step_size: float | None = None,
        perturber: Perturber | str | None = None,
        corruptions: list[str] | None = None,
        consistency: bool = False,
        judge: Callable | None = None,
        reverse_consistency: bool = False,
        image_similarity: Callable | None = None,
        caption_question: str | list[str] = DEFAULT_CAPTION_QUESTION,
        caption_template: str | None = None,
        caption_max_new_tokens: int = 32,
        generation_guidance_scale: float | None = None,
        generation_temperature: float | None = None,
        seed: int = 0,
        show_progress: bool = True,
        interface: VisualTokenInterface | None = None,
        question_column: str = "question",
        image_column: str = "image",
        caption_column: str = "caption",
        group_column: str = "group_id",
        question_id_column: str = "question_id",
        image_id_column: str = "image_id",
    ):
        self.model = model
        self.interface = interface if interface is not None else get_interface(model, processor)
        if self.interface.processor is None:
            self.interface.processor = processor
        if batch_size < 1 or max_new_tokens < 1:
            raise ValueError(f"`batch_size` and `max_new_tokens` must be >= 1, got {batch_size} and {max_new_tokens}.")
        self.batch_size = batch_size
        self.max_new_tokens = max_new_tokens
        if attack_eps is None:
            attack_eps = []
        self.attack_eps = (
            [float(attack_eps)] if isinstance(attack_eps, (int, float)) else [float(e) for e in attack_eps]
        )
        if any(e <= 0 for e in self.attack_eps):
            raise ValueError(f"Attack budgets must be > 0, got {self.attack_eps}.")
        if attack_budget not in ATTACK_BUDGETS:
            raise ValueError(f"`attack_budget` must be one of {list(ATTACK_BUDGETS)}, got {attack_budget!r}.")
        if attack_steps < 1:
            raise ValueError(f"`attack_steps` must be >= 1, got {attack_steps}.")
        self.attack_budget = attack_budget
        self.attack_steps = attack_steps
        self.attack_step_size = attack_step_size
        self.corruptions = parse_corruptions(corruptions)
        if judge is not None and not consistency:
            raise ValueError("A `judge` scores the round trip's generated images: pass `consistency=True` with it.")
        self.consistency = consistency
        self.judge = judge
        self._set_reverse(reverse_consistency, image_similarity, caption_question, caption_template)
        if caption_max_new_tokens < 1:
            raise ValueError(f"`caption_max_new_tokens` must be >= 1, got {caption_max_new_tokens}.")
        self.caption_max_new_tokens = caption_max_new_tokens
        self.generation_guidance_scale = generation_guidance_scale
        self.generation_temperature = generation_temperature
        self.seed = seed
        self.show_progress = show_progress
        self.columns = {
            "question": question_column,
            "image": image_column,
            "caption": caption_column,
            "group": group_column,
            "question_id": question_id_column,
            "image_id": image_id_column,
        }
        self._check_interface()
        self.perturber = self._load_perturber(perturber)
        self._vqa = load_module("vqa_accuracy")
        self._groups = load_module("group_accuracy")

    # ------------------------------------------------------------------------------------------------ set-up
    def _check_interface(self) -> None:
        interface = self.interface
        name = type(interface).__name__
        if type(interface).answer is VisualTokenInterface.answer:
            raise NotImplementedError(
                f"{name} cannot answer questions (it does not implement `answer`), so it cannot be evaluated."
            )
        if self.attack_eps:
            try:
                site = interface.understanding_site
            except (NotImplementedError, AttributeError) as error:
                raise NotImplementedError(
                    f"{name} cannot be attacked: it exposes no understanding site ({error}). Pass `attack_eps=None`."
                ) from error
            if not isinstance(site, nn.Module):
                raise NotImplementedError(
                    f"{name} cannot be attacked: its understanding site is a {type(site).__name__}, not a module. "
                    "Pass `attack_eps=None`."
                )

    def _set_reverse(self, reverse_consistency, image_similarity, caption_question, caption_template) -> None:
        if image_similarity is not None and not reverse_consistency:
            raise ValueError(
                "An `image_similarity` compares the reverse round trip's drawings with the real images: pass "
                "`reverse_consistency=True` with it."
            )
        if reverse_consistency and image_similarity is None:
            raise ValueError(
                "`reverse_consistency=True` needs an `image_similarity`: a `(generated, real) -> scores` callable, a "
                "DigitJudge (same digit and colour) or a CLIPConsistencyScorer (CLIP image-image cosine)."
            )
        questions = [caption_question] if isinstance(caption_question, str) else list(caption_question)
        if not questions or not all(isinstance(q, str) and q.strip() for q in questions):
            raise ValueError(f"`caption_question` must be one or more non-empty questions, got {caption_question!r}.")
        if caption_template is not None:
            try:
                caption_template.format(*questions)
            except (IndexError, KeyError, ValueError) as error:
                raise ValueError(
                    f"`caption_template` {caption_template!r} must use positional fields {{0}}..{{{len(questions) - 1}}}"
                    f" (one per caption question): {error!r}."
                ) from error
        self.reverse_consistency = reverse_consistency
        self.image_similarity = as_image_similarity(image_similarity)
        self.caption_questions = questions
        self.caption_template = caption_template

    def _load_perturber(self, perturber) -> Perturber | None:
        if perturber is None:
            return None
        if isinstance(perturber, (str, bytes)) or hasattr(perturber, "__fspath__"):
            perturber = Perturber.from_pretrained(str(perturber))
        if not isinstance(perturber, Perturber):
            raise TypeError(f"`perturber` must be a Perturber or a folder, got {type(perturber).__name__}.")
        if perturber.config.hidden_size != self.interface.hidden_size:
            raise ValueError(
                f"The perturber was built for hidden size {perturber.config.hidden_size}, but the model's visual "
                f"tokens have hidden size {self.interface.hidden_size}."
            )
        return perturber

    def _check_dataset(self, dataset) -> None:
        columns = getattr(dataset, "column_names", None)
        if isinstance(columns, dict):
            raise ValueError(f"Got a DatasetDict with splits {list(columns)}: pass one split, e.g. dataset['test'].")
        if columns is None:
            raise TypeError(f"`dataset` must be a `datasets.Dataset`, got {type(dataset).__name__}.")
        required = [self.columns["image"], self.columns["question"]]
        missing = [c for c in required if c not in columns]
        if "answers" not in columns and "answer" not in columns:
            missing.append("answer (or an `answers` list)")
        if missing:
            raise ValueError(
                f"The evaluation dataset is missing the column(s) {missing}; it has {columns}. The reference answers "
                "are read from `answers` (a list) or `answer`; map other layouts with "
                "`trl_unigame.data.to_vqa_format`."
            )
        if len(dataset) == 0:
            raise ValueError("The evaluation dataset is empty.")
        if self.consistency and self.columns["caption"] not in columns:
            raise ValueError(
                f"`consistency=True` needs a {self.columns['caption']!r} column (the prompt of the round trip); the "
                f"dataset has {columns}."
            )

    def conditions(self) -> list[str]:
        """Names of the conditions evaluated, in order (each is a prefix of the metric keys)."""
        names = ["clean", *self._attack_names()]
        if self.perturber is not None:
            names.append("perturber")
        names += [f"corrupt_{name}_{severity}" for name, severity in self.corruptions]
        if self.consistency:
            names.append("consistency")
        if self.reverse_consistency:
            names.append("reverse_consistency")
        return names

    def _attack_names(self) -> list[str]:
        tag = "eps" if self.attack_budget == "absolute" else "rel"
        return [f"attack_{tag}{eps:g}" for eps in self.attack_eps]

    # ------------------------------------------------------------------------------------------- evaluation
    def evaluate(self, dataset, return_predictions: bool = False):
        r"""
        Answers every row of `dataset` under each condition and scores the answers.

        Args:
            dataset (`datasets.Dataset`):
                Rows with an image, a question and reference answers (`answer`, or an `answers` list); optionally a
                caption (for the round trip) and a group id (for group accuracy). TRL's conversational layout
                (`messages` + `images`) is mapped with [`~data.to_vqa_format`].
            return_predictions (`bool`, *optional*, defaults to `False`):
                Also return the per-row answers and scores.

        Returns:
            `dict[str, float]`, or `(metrics, predictions)` with `return_predictions=True`, where `predictions` is a
            list with one dict per row: `question`, `references`, and for each condition its answer (`"clean"`) and
            score (`"clean/score"`).

        Under several processes (an initialized `torch.distributed` process group, as in a `Trainer` launched with
        `accelerate launch` or `torchrun`), each process answers its own contiguous shard of `dataset`, the rows are
        gathered, and every process returns the metrics (and predictions) of the whole dataset. Corruption noise is
        seeded by the row's index in `dataset`, so it does not depend on the sharding; the round trips sample their
        images from one generator per process (each its own), so their samples do.
        """
        dataset = self._as_vqa(dataset)
        self._check_dataset(dataset)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        world_size = torch.distributed.get_world_size() if distributed else 1
        rank = torch.distributed.get_rank() if distributed else 0
        offset = 0
        if world_size > 1:  # contiguous shards, the first `extra` one row longer; `offset` is this shard's first row
            per_process, extra = divmod(len(dataset), world_size)
            offset = rank * per_process + min(rank, extra)
            dataset = dataset.select(range(offset, offset + per_process + (rank < extra)))
        from tqdm.auto import tqdm

        columns = dataset.column_names
        answer_column = "answers" if "answers" in columns else "answer"
        has_groups = self.columns["group"] in columns
        model = self.model
        was_training = model.training
        attached_here = self.perturber is not None and not self.perturber.is_attached
        if attached_here:
            self.perturber.to(device=self.interface.device, dtype=torch.float32).attach(model)
        rows: list[dict[str, Any]] = []
        generator = torch.Generator(device=self.interface.device).manual_seed(self.seed + offset)
        # The reverse round trip draws from its own generator: turning it on leaves the round trip's samples as they are.
        generators = (
            generator,
            torch.Generator(device=self.interface.device).manual_seed(self.seed + offset + REVERSE_SEED),
        )
        model.eval()
        try:
            starts = range(0, len(dataset), self.batch_size)
            show = self.show_progress and rank == 0
            for start in tqdm(starts, desc="Evaluating", unit="batch", disable=not show):
                batch = dataset[start : start + self.batch_size]
                references = [reference_answers(a) for a in batch[answer_column]]
                batch_rows = [
                    {"index": offset + start + i, "question": q, "references": r}
                    for i, (q, r) in enumerate(zip(batch[self.columns["question"]], references))
                ]
                if has_groups:
                    self._add_group_keys(batch, batch_rows, columns)
                for name, answers in self._answer_batch(batch, references, offset + start, generators).items():
                    for row, answer in zip(batch_rows, answers):
                        if answer is not None:
                            row[name] = answer
                rows.extend(batch_rows)
        finally:
            model.train(was_training)
            if attached_here:
                self.perturber.detach()
        if world_size > 1:
            shards: list = [None] * world_size
            torch.distributed.all_gather_object(shards, rows)
            rows = [row for shard in shards for row in shard]  # in rank order: the dataset's order
        metrics = self._score(rows, has_groups)
        if return_predictions:
            return metrics, rows
        return metrics

    def _as_vqa(self, dataset):
        columns = getattr(dataset, "column_names", None) or []
        if not isinstance(columns, dict) and "messages" in columns and self.columns["question"] not in columns:
            from ..data import to_vqa_format

            return to_vqa_format(dataset)
        return dataset

    def _add_group_keys(self, batch, batch_rows, columns) -> None:
        group_ids = batch[self.columns["group"]]
        if self.columns["question_id"] in columns:
            question_ids = batch[self.columns["question_id"]]
        else:
            question_ids = batch[self.columns["question"]]
        if self.columns["image_id"] in columns:
            image_ids = batch[self.columns["image_id"]]
        else:
            image_ids = [_image_id(image) for image in batch[self.columns["image"]]]
        for row, group, question, image in zip(batch_rows, group_ids, question_ids, image_ids):
            row.update(group_id=str(group), question_id=str(question), image_id=str(image))

    def _answer(self, images, questions) -> list[str]:
        return self.interface.answer(self.model, images, questions, max_new_tokens=self.max_new_tokens)

    def _answer_batch(self, batch, references, start: int, generators) -> dict[str, list]:
        """Answers of one batch under every condition; `generators`: those of the round trip and of the reverse one."""
        images = [image.convert("RGB") for image in batch[self.columns["image"]]]
        questions = batch[self.columns["question"]]
        out = {}
        with self._perturber_off():
            out["clean"] = self._answer(images, questions)
            if self.attack_eps:
                targets = [majority_answer(r) for r in references]
                inputs = self.interface.build_understanding_inputs(images, questions, targets)
                inputs = {k: v.to(self.interface.device) for k, v in inputs.items()}
                for eps, name in zip(self.attack_eps, self._attack_names()):
                    delta = pgd_attack(
                        self.interface,
                        self.model,
                        inputs,
                        eps,
                        steps=self.attack_steps,
                        step_size=self.attack_step_size,
                        budget=self.attack_budget,
                    )
                    with perturbation_at(
                        self.interface.understanding_site, delta, self.interface.site_mask("understanding")
                    ):
                        out[name] = self._answer(images, questions)
            for name, severity in self.corruptions:
                corrupted = [
                    corrupt_image(image, name, severity, seed=[self.seed, start + i]) for i, image in enumerate(images)
                ]
                out[f"corrupt_{name}_{severity}"] = self._answer(corrupted, questions)
        if self.perturber is not None:
            gradient = None
            if self.perturber.sees_gradient:
                gradient = self._answer_gradient(images, questions, references)
            with self.perturber.active(), self.perturber.gradients(understanding=gradient):
                out["perturber"] = self._answer(images, questions)
        if self.consistency:
            with self._perturber_off():
                out.update(self._round_trip(batch, questions, generators[0]))
        if self.reverse_consistency:
            with self._perturber_off():
                out.update(self._reverse_round_trip(batch, images, generators[1]))
        return out

    def _answer_gradient(self, images, questions, references) -> torch.Tensor | None:
        """The gradient of the answer loss (against each row's majority answer) at the understanding site's output, as
        a gradient-reading perturber sees it in training, with the perturber off."""
        from ..game.adversary import SiteCapture

        targets = [majority_answer(r) for r in references]
        inputs = self.interface.build_understanding_inputs(images, questions, targets)
        inputs = {k: v.to(self.interface.device) for k, v in inputs.items()}
        with torch.enable_grad(), self.perturber.disabled(), SiteCapture(self.interface) as capture:
            with capture.recording():
                loss = self.interface.understanding_loss(self.model, inputs).sum()
            return capture.site_gradient(loss)

    def _perturber_off(self):
        return self.perturber.disabled() if self.perturber is not None else contextlib.nullcontext()

    def _draw(self, captions: list[str], generator, measure: str, option: str) -> torch.Tensor:
        """One image per caption with the evaluator's guidance and temperature; a clear error when the model cannot
        draw (`measure` names what needed the drawings, `option` the argument that turns it off)."""
        try:
            return self.interface.generate_images(
                captions,
                num_images=1,
                guidance_scale=self.generation_guidance_scale,
                temperature=self.generation_temperature,
                generator=generator,
            )
        except NotImplementedError as error:
            raise NotImplementedError(
                f"{type(self.interface).__name__} cannot generate images, so {measure} cannot be measured: pass "
                f"`{option}=False`."
            ) from error

    def _round_trip(self, batch, questions, generator) -> dict[str, list]:
        captions = batch[self.columns["caption"]]
        keep = [i for i, c in enumerate(captions) if isinstance(c, str) and c.strip()]
        answers: list = [None] * len(captions)
        scores: list = [None] * len(captions)
        if keep:
            pixels = self._draw([captions[i] for i in keep], generator, "the round-trip consistency", "consistency")
            for i, answer in zip(keep, self._answer(pixels, [questions[i] for i in keep])):
                answers[i] = answer
            if self.judge is not None:
                judged = torch.as_tensor(self.judge(pixels, [captions[i] for i in keep]), dtype=torch.float32)
                for i, score in zip(keep, judged.flatten().tolist()):
                    scores[i] = score
        out = {"consistency": answers}
        if self.judge is not None:
            out["consistency/judge"] = scores
        return out

    def caption(self, images) -> list[str]:
        """The model's own captions of `images`: its answers to `caption_question` (filled into `caption_template`
        when there are several questions or a template)."""
        answers = [
            self.interface.answer(self.model, images, [q] * len(images), max_new_tokens=self.caption_max_new_tokens)
            for q in self.caption_questions
        ]
        per_image = [[a.strip() for a in row] for row in zip(*answers)]
        if self.caption_template is not None:
            return [self.caption_template.format(*row) for row in per_image]
        return [" ".join(row) for row in per_image]

    def _reverse_round_trip(self, batch, images, generator) -> dict[str, list]:
        captions = self.caption(images)
        pixels = self._draw(captions, generator, "the reverse consistency", "reverse_consistency")
        similarity = torch.as_tensor(self.image_similarity(pixels, images), dtype=torch.float32).flatten().tolist()
        out = {"reverse_consistency": captions, "reverse_consistency/similarity": similarity}
        if self.columns["caption"] in batch:
            references = batch[self.columns["caption"]]
            scored = [i for i, c in enumerate(references) if isinstance(c, str) and c.strip()]
            caption_scores: list = [None] * len(captions)
            if scored:
                scores = self._vqa.vqa_scores([captions[i] for i in scored], [[references[i]] for i in scored])
                for i, score in zip(scored, scores):
                    caption_scores[i] = score
            out["reverse_consistency/caption_score"] = caption_scores
        return out

    # ------------------------------------------------------------------------------------------------ scoring
    def _score(self, rows: list[dict[str, Any]], has_groups: bool) -> dict[str, float]:
        metrics = {}
        for name in self.conditions():
            if name == "reverse_consistency":  # a caption and an image similarity, not an answer: scored below
                continue
            scored = [r for r in rows if name in r]
            if not scored:
                continue
            scores = self._vqa.vqa_scores([r[name] for r in scored], [r["references"] for r in scored])
            for row, score in zip(scored, scores):
                row[f"{name}/score"] = score
            metrics[f"{name}/vqa_accuracy"] = sum(scores) / len(scores)
            if has_groups and name != "consistency":
                groups = self._groups.group_scores(
                    [r[name] for r in scored],
                    [r["references"] for r in scored],
                    [r["group_id"] for r in scored],
                    [r["question_id"] for r in scored],
                    [r["image_id"] for r in scored],
                )
                metrics.update({f"{name}/{key}": value for key, value in groups.items()})
        judged = [r["consistency/judge"] for r in rows if r.get("consistency/judge") is not None]
        if judged:
            metrics["consistency/judge_score"] = sum(judged) / len(judged)
        for key, metric in (("similarity", "similarity"), ("caption_score", "caption_accuracy")):
            values = [r[f"reverse_consistency/{key}"] for r in rows if r.get(f"reverse_consistency/{key}") is not None]
            if values:
                metrics[f"reverse_consistency/{metric}"] = sum(values) / len(values)
        return metrics
