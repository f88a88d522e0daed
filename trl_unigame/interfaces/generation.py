"""The image-generation loop every generative family shares: a static KV cache, one mask over it, a one-token step
(compiled on request), guidance and sampling. A family supplies only its own parts (prompts, scores, embeddings)."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
from typing import Callable

import torch
from torch import nn


#: Guidance scale of image generation when neither the caller nor the model's `generation_config` sets one.
DEFAULT_GUIDANCE_SCALE = 5.0
#: Sampling temperature of image tokens when neither the caller nor the model's `generation_config` sets one.
DEFAULT_TEMPERATURE = 1.0


# The grid row of each image token being fed back through the generation site, while the loop (or its teacher-forced
# pass) embeds it: what a perturber with per-row budgets (`site_budgets["generation"]["row_scales"]`) reads.
_GENERATION_ROWS: contextvars.ContextVar[torch.Tensor | None] = contextvars.ContextVar("generation_rows", default=None)


@contextlib.contextmanager
def generation_rows(rows: torch.Tensor | None):
    """Inside it, [`current_generation_rows`] is `rows`: the grid row of each position of the image tokens being fed
    back, `(positions,)`, broadcast over the batch."""
    token = _GENERATION_ROWS.set(rows)
    try:
        yield
    finally:
        _GENERATION_ROWS.reset(token)


def current_generation_rows() -> torch.Tensor | None:
    """The grid rows of the image tokens the generation site is embedding now (see [`generation_rows`]), or `None`
    outside image generation."""
    return _GENERATION_ROWS.get()


@contextlib.contextmanager
def checkpointed_in_eval(language_model: nn.Module):
    """Inside it, the layers of `language_model` that the run checkpoints (`gradient_checkpointing_enable`) checkpoint
    in eval mode too: a differentiable pass then keeps each such layer's input, not its activations.

    Transformers checkpoints a layer only in training mode. Only each checkpointed layer's own `training` flag is set,
    not its submodules', so dropout (attention's, LoRA's) stays off and the pass computes what eval mode computes. A
    reentrant checkpoint function is swapped for the non-reentrant one with the same options: `torch.autograd.grad`
    (which leaves every other `.grad` alone) needs it, and in eval mode both recompute the same values.
    """
    from transformers.modeling_layers import GradientCheckpointingLayer

    layers = [
        m
        for m in language_model.modules()
        if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing and not m.training
    ]
    swapped = []
    for layer in layers:
        layer.training = True  # this module only: `.train()` would turn on its dropout too
        function = layer.__dict__.get("_gradient_checkpointing_func")
        if function is not None and _reentrant(function):
            layer._gradient_checkpointing_func = _without_reentrance(function)
            swapped.append((layer, function))
    try:
        yield
    finally:
        for layer in layers:
            layer.training = False
        for layer, function in swapped:
            layer._gradient_checkpointing_func = function


def _reentrant(function: Callable) -> bool:
    """Whether a checkpoint function (`torch.utils.checkpoint.checkpoint`, or a `functools.partial` over it or over a
    wrapper that passes its options on, as transformers makes them) runs the reentrant variant, torch's default."""
    from torch.utils.checkpoint import checkpoint

    if function is checkpoint:
        return True
    if isinstance(function, functools.partial):
        return function.keywords.get("use_reentrant", function.func is checkpoint)
    return False


def _without_reentrance(function: Callable) -> Callable:
    """The same checkpoint function with `use_reentrant=False`."""
    if isinstance(function, functools.partial):
        return functools.partial(function.func, *function.args, **{**function.keywords, "use_reentrant": False})
    return functools.partial(function, use_reentrant=False)


def _sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of `probs` `(rows, candidates)`: `torch.multinomial(probs, 1)`'s own algorithm
    (`argmax(probs / q)`, `q ~ Exp(1)`), so the same generator draws the same tokens, without the validity checks it
    reads back to the host on every call (the caller checks once per loop)."""
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(-1)


def _kv_cache_keyword(language_model: nn.Module) -> str:
    """The keyword under which `language_model.forward` reads its KV cache: `cache` from transformers 5.24 on,
    `past_key_values` before.

    Raises:
        TypeError: when the forward takes neither; its `**kwargs` would swallow the cache, and generation would
            silently run without one.
    """
    parameters = inspect.signature(language_model.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in parameters:
            return name
    raise TypeError(
        f"{type(language_model).__name__}.forward takes neither `cache` nor `past_key_values`: no KV cache can be "
        "passed to it."
    )


class ImageTokenLoop:
    """The token loop of image generation, shared by the interfaces of families that generate images.

    The interface's `__init__` sets `_compiled_steps` (the compiled one-token steps, per language model and compile
    config) and `_generation_caches` (the static KV caches kept between compiled calls)."""

    def generation_settings(
        self, guidance_scale: float | None = None, temperature: float | None = None
    ) -> tuple[float, float]:
        """The guidance scale and temperature image generation uses: each argument given as it is, and each `None`
        read from the model's `generation_config` (`guidance_scale`, and `temperature`, the transformers names), or
        `DEFAULT_GUIDANCE_SCALE` (5.0) and `DEFAULT_TEMPERATURE` (1.0) when the model's config does not set it.

        Args:
            guidance_scale (`float`, *optional*): Classifier-free guidance scale; `None` takes the model's.
            temperature (`float`, *optional*): Sampling temperature (`0` is greedy); `None` takes the model's.

        Returns:
            `tuple[float, float]`: `(guidance_scale, temperature)`.
        """
        config = getattr(self.base_model, "generation_config", None)
        if guidance_scale is None:
            guidance_scale = getattr(config, "guidance_scale", None)
            guidance_scale = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
        if temperature is None:
            temperature = getattr(config, "temperature", None)
            temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
        return float(guidance_scale), float(temperature)

    def _token_loop(
        self, language_model: nn.Module, attention_mask: torch.Tensor, new_tokens: int, compile_config=None
    ):
        """What an image-generation loop of `new_tokens` steps after a prompt with `attention_mask` needs: a
        `transformers.StaticCache`, one mask over the whole cache (future positions 0; the loop sets position
        `prompt_length + i` to 1 after step `i`), the eager step for the prompt, and the step for one new token
        (compiled with `compile_config`). The mask spans the whole cache so the one-token step's shapes never change.

        When compiling, the cache length is rounded up to a multiple of 64 so prompts of similar length share a graph,
        and the cache is kept and reset (not rebuilt) by the next call with the same batch, cache length, dtype and
        device: the compiled step then sees the very same tensors, which CUDA graphs replay instead of recording
        again. One cache is kept per batch size (a new cache length replaces it); `clear_generation_caches` frees them.
        """
        from transformers import StaticCache

        rows, prompt_length = attention_mask.shape
        cache_length = prompt_length + new_tokens
        if compile_config is None:
            # Nothing to gain from keeping it: the eager step does not care which tensors it gets.
            cache = StaticCache(config=language_model.config, max_cache_len=cache_length)
        else:
            cache_length = -(-cache_length // 64) * 64
            device = attention_mask.device
            # The cache's tensors take the dtype of the keys and values, which autocast decides when it is on.
            autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
            dtype = next(p.dtype for p in language_model.parameters() if p.is_floating_point())
            key = (id(language_model), rows, dtype, autocast, device)
            kept_length, cache = self._generation_caches.get(key, (None, None))
            if kept_length == cache_length:
                cache.reset()
            else:
                cache = StaticCache(config=language_model.config, max_cache_len=cache_length)
                self._generation_caches[key] = (cache_length, cache)
        full_mask = attention_mask.new_zeros((rows, cache_length))
        full_mask[:, :prompt_length] = attention_mask
        prompt_step = self._token_step(language_model)
        step = prompt_step if compile_config is None else self._token_step(language_model, compile_config)
        return cache, full_mask, prompt_step, step

    def _token_step(self, language_model: nn.Module, compile_config=None) -> Callable:
        """The one-token step of an image-generation loop: `step(embeds, attention_mask, position_ids, cache)` runs the
        LLM on one new position per row against a `transformers.StaticCache` and returns the last hidden states,
        `(batch, hidden)`. With a `transformers.CompileConfig`, the step is compiled once per interface and config;
        `torch.compile` traces one graph for the first shapes it sees, and one more for each batch size or cache
        length that it then makes dynamic (see `mining_compile` in docs/method.md)."""
        cache_keyword = _kv_cache_keyword(language_model)

        def step(embeds, attention_mask, position_ids, cache):
            if torch.is_autocast_enabled(embeds.device.type):
                # Under autocast the rotary tables take the embeddings' dtype: float32 embeddings would give float32
                # keys beside autocast's values, which the static cache cannot hold in one dtype.
                embeds = embeds.to(torch.get_autocast_dtype(embeds.device.type))
            out = language_model(
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                **{cache_keyword: cache},
            )
            return out.last_hidden_state[:, -1]

        if compile_config is None:
            return step
        options = compile_config.to_dict()
        key = (id(language_model), repr(sorted(options.items())))
        if key not in self._compiled_steps:
            self._compiled_steps[key] = torch.compile(step, **options)
        return self._compiled_steps[key]

    def _generate_image_tokens(
        self,
        language_model: nn.Module,
        prompt: tuple[torch.Tensor, torch.Tensor],
        unconditional_prompt: tuple[torch.Tensor, torch.Tensor],
        num_images: int,
        num_tokens: int,
        image_scores: Callable[[torch.Tensor], torch.Tensor],
        embed_image_tokens: Callable[[torch.Tensor], torch.Tensor],
        guidance_scale: float | None,
        temperature: float | None,
        generator: torch.Generator | None = None,
        compile_config=None,
        candidate_ids: torch.Tensor | None = None,
        forced_token: Callable[[int], int | None] | None = None,
        tokens_per_row: int | None = None,
    ) -> torch.Tensor:
        """The image-generation loop of the unified families: samples `num_tokens` tokens for each of `num_images`
        images per prompt, with classifier-free guidance, on a `transformers.StaticCache` (see
        [`~VisualTokenInterface._token_loop`]).

        The batch is doubled: each prompt's row `num_images` times, then as many unconditional rows. The prompt is
        embedded by the model's input embeddings and runs eagerly; every later step feeds the token sampled for a row
        back to that row and to its unconditional twin through `embed_image_tokens`, and runs the LLM on that one
        position (compiled with `compile_config`).

        Args:
            language_model (`torch.nn.Module`):
                The LLM without its head (its output has `last_hidden_state`).
            prompt (`tuple[torch.Tensor, torch.Tensor]`):
                Left-padded token ids and attention mask of the prompts, `(num_prompts, length)`.
            unconditional_prompt (`tuple[torch.Tensor, torch.Tensor]`):
                The same for the unconditional branch, at the same length: one row per prompt, or one row for all.
            num_images (`int`): Images per prompt.
            num_tokens (`int`): Tokens to generate per image.
            image_scores (`Callable`):
                Last hidden states `(2 * batch, hidden)` to scores over the candidate tokens `(2 * batch, candidates)`.
            embed_image_tokens (`Callable`):
                Token ids `(2 * batch, 1)` to the embeddings fed back: through the generation site, so that a
                perturber's hook sees every sampled token.
            guidance_scale (`float`): `uncond + guidance_scale * (cond - uncond)` on the scores; `None` takes the
                model's (see [`~ImageTokenLoop.generation_settings`]).
            temperature (`float`): Sampling temperature; `0` takes the argmax; `None` takes the model's.
            generator (`torch.Generator`, *optional*): Seeds the sampling.
            compile_config (`transformers.CompileConfig`, *optional*): Compiles the one-token step.
            candidate_ids (`torch.Tensor`, *optional*):
                The token id of each column of `image_scores`; `None` when the column is the id.
            forced_token (`Callable`, *optional*):
                Step index to a token id that every row takes at that step without sampling, or `None` to sample.
            tokens_per_row (`int`, *optional*):
                Tokens per row of the generated grid (forced ones included): the fed-back token `i` is on row
                `i // tokens_per_row`, which [`current_generation_rows`] gives the generation site.

        Returns:
            `torch.Tensor`: The tokens, `(num_prompts * num_images, num_tokens)`, grouped by prompt.

        Raises:
            RuntimeError: when a sampling distribution was not finite (checked once, after the loop: the loop reads
                nothing back to the host).
        """
        guidance_scale, temperature = self.generation_settings(guidance_scale, temperature)
        ids, mask = (t.repeat_interleave(num_images, dim=0) for t in prompt)
        batch = ids.shape[0]
        uncond_ids, uncond_mask = (
            t.expand(batch, -1) if t.shape[0] == 1 else t.repeat_interleave(num_images, dim=0)
            for t in unconditional_prompt
        )
        input_ids = torch.cat([ids, uncond_ids])
        attention_mask = torch.cat([mask, uncond_mask])
        prompt_length = input_ids.shape[1]
        cache, full_mask, prompt_step, step = self._token_loop(
            language_model, attention_mask, num_tokens, compile_config
        )
        embeds = self.base_model.get_input_embeddings()(input_ids)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        tokens = torch.empty((batch, num_tokens), dtype=torch.long, device=input_ids.device)
        grid_rows = None  # the grid row of each token, made once: a view of it per step, no copy to the device
        valid = torch.ones((), dtype=torch.bool, device=input_ids.device)  # every sampling distribution finite
        if tokens_per_row is not None:
            grid_rows = torch.arange(num_tokens, device=input_ids.device) // tokens_per_row
        for i in range(num_tokens):
            hidden = (prompt_step if i == 0 else step)(embeds, full_mask, position_ids, cache)
            forced = forced_token(i) if forced_token is not None else None
            if forced is not None:
                next_token = tokens.new_full((batch,), forced)
            else:
                scores = image_scores(hidden).float()
                cond, uncond = scores[:batch], scores[batch:]
                logits = uncond + guidance_scale * (cond - uncond)
                if temperature > 0:
                    probs = torch.softmax(logits / temperature, dim=-1)
                    next_token = _sample(probs, generator)
                    valid = valid & torch.isfinite(probs).all()
                else:
                    next_token = logits.argmax(-1)
                if candidate_ids is not None:
                    next_token = candidate_ids[next_token]
            tokens[:, i] = next_token
            with generation_rows(None if grid_rows is None else grid_rows[i : i + 1]):
                embeds = embed_image_tokens(torch.cat([next_token, next_token]).unsqueeze(-1))
            full_mask[:, prompt_length + i] = 1
            position_ids = position_ids[:, -1:] + 1
        if not bool(valid):  # read once, after the loop
            raise RuntimeError("Image generation sampled from scores that are not finite (inf or nan).")
        return tokens

    def _image_token_log_probs(
        self,
        language_model: nn.Module,
        prompt: tuple[torch.Tensor, torch.Tensor],
        unconditional_prompt: tuple[torch.Tensor, torch.Tensor],
        tokens: torch.Tensor,
        num_images: int,
        image_scores: Callable[[torch.Tensor], torch.Tensor],
        embed_image_tokens: Callable[[torch.Tensor], torch.Tensor],
        guidance_scale: float | None,
        temperature: float | None,
        candidate_ids: torch.Tensor | None = None,
        forced_token: Callable[[int], int | None] | None = None,
        num_tokens: int | None = None,
        tokens_per_row: int | None = None,
    ) -> torch.Tensor:
        """The log-probability of each of `tokens` under the distribution [`_generate_image_tokens`] samples from,
        teacher-forced: one pass of the LLM over the prompts followed by the tokens (fed back through
        `embed_image_tokens`, so a perturber at the generation site acts as it did while sampling), for the
        conditional and unconditional rows, then `log_softmax((uncond + guidance_scale * (cond - uncond)) /
        temperature)` at each sampled token. Differentiable (it runs under the caller's grad mode).

        Args:
            tokens (`torch.Tensor`):
                The sampled tokens, `(num_prompts * num_images, num_tokens)`, grouped by prompt, as
                [`_generate_image_tokens`] returns them (vocabulary ids where `candidate_ids` is given).
            num_tokens (`int`, *optional*): Checked against `tokens` when given.
            The other arguments: as for [`_generate_image_tokens`] (`None` guidance or temperature takes the model's,
            as there); the temperature must be positive.

        Returns:
            `torch.Tensor`: float32 log-probabilities `(num_prompts * num_images, num_tokens)`; 0 at forced steps
            (nothing was sampled there).
        """
        guidance_scale, temperature = self.generation_settings(guidance_scale, temperature)
        if temperature <= 0:
            raise ValueError(
                f"Greedy generation (temperature {temperature}) samples nothing: its tokens have no log-probability."
            )
        ids, mask = (t.repeat_interleave(num_images, dim=0) for t in prompt)
        batch, length = tokens.shape
        if ids.shape[0] != batch or (num_tokens is not None and num_tokens != length):
            raise ValueError(
                f"Got {batch} token rows of {length} tokens for {prompt[0].shape[0]} prompts x {num_images} images "
                f"of {num_tokens if num_tokens is not None else length} tokens: they must match."
            )
        uncond_ids, uncond_mask = (
            t.expand(batch, -1) if t.shape[0] == 1 else t.repeat_interleave(num_images, dim=0)
            for t in unconditional_prompt
        )
        input_ids = torch.cat([ids, uncond_ids])
        prompt_length = input_ids.shape[1]
        tokens = tokens.to(input_ids.device)
        fed = torch.cat([tokens, tokens])[:, :-1]  # the last token is never fed back
        rows = None
        if tokens_per_row is not None:
            rows = torch.arange(fed.shape[1], device=tokens.device) // tokens_per_row
        with generation_rows(rows):
            fed_embeds = embed_image_tokens(fed)
        embeds = torch.cat([self.base_model.get_input_embeddings()(input_ids), fed_embeds], dim=1)
        attention_mask = torch.cat([mask, uncond_mask])
        attention_mask = torch.cat([attention_mask, attention_mask.new_ones(fed.shape)], dim=1)
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        with checkpointed_in_eval(language_model):
            hidden = language_model(
                inputs_embeds=embeds, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            ).last_hidden_state[:, prompt_length - 1 :]  # position prompt_length - 1 + i predicts token i
        scores = image_scores(hidden.reshape(-1, hidden.shape[-1])).float().view(2 * batch, length, -1)
        cond, uncond = scores[:batch], scores[batch:]
        log_probs = torch.log_softmax((uncond + guidance_scale * (cond - uncond)) / temperature, dim=-1)
        columns = tokens
        if candidate_ids is not None:
            lookup = torch.full((int(candidate_ids.max()) + 1,), -1, dtype=torch.long, device=tokens.device)
            lookup[candidate_ids.to(tokens.device)] = torch.arange(len(candidate_ids), device=tokens.device)
            columns = lookup[tokens.clamp(max=len(lookup) - 1)]
        forced = torch.tensor(
            [forced_token is not None and forced_token(i) is not None for i in range(length)], device=tokens.device
        ).expand(batch, -1)
        if bool(((columns < 0) & ~forced).any()):
            raise ValueError("A sampled position holds a token that is not one of the image-token candidates.")
        chosen = log_probs.gather(-1, columns.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        return chosen.masked_fill(forced, 0.0)

    def clear_generation_caches(self) -> None:
        """Frees the KV caches that image generation with a `compile_config` keeps between calls. The compiled steps
        stay; the next call builds its cache again (and CUDA graphs record again)."""
        self._generation_caches.clear()
