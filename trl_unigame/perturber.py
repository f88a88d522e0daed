"""The perturber C: a tiny per-token network at the shared visual-token interface, shipped as a PEFT-style adapter."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard, ModelCardData, PyTorchModelHubMixin
from torch import nn

from .interfaces import get_interface
from .interfaces.generation import current_generation_rows


PERTURBER_SITES = ("understanding", "generation")
BUDGETS = ("absolute", "relative")
# What the perturber's MLP reads per token: the token alone (the paper), or the token and U's loss gradient there.
PERTURBER_INPUTS = ("features", "features_and_gradient", "gradient")
# Tokens per call on which the realized perturbation is measured (a cheap sample, not the whole batch).
MEASURED_TOKENS = 256
PAPER_URL = "https://arxiv.org/abs/2511.19413"
CITATION = """@article{su2025unigame,
  title   = {UniGame: Turning a Unified Multimodal Model Into Its Own Adversary},
  author  = {Su, Zhaolong and Lu, Wang and Chen, Hao and Li, Sharon and Wang, Jindong},
  journal = {arXiv preprint arXiv:2511.19413},
  year    = {2025},
}"""


@dataclass
class PerturberConfig:
    r"""
    Configuration of a [`Perturber`].

    Args:
        hidden_size (`int`):
            Width of the shared visual-token space (the LLM's hidden size: 2048 for Janus-Pro-1B, 4096 for -7B).
        width (`int`, *optional*):
            Width of the hidden layers of the per-token MLP. Defaults to `hidden_size`.
        depth (`int`, *optional*, defaults to `3`):
            Number of linear layers of the MLP (the paper's ablation prefers 3 over 2 or 4).
        eps_max (`float`, *optional*, defaults to `0.02`):
            Largest per-token L2 norm of the perturbation.
        eps_min (`float`, *optional*, defaults to `0.0`):
            Smallest per-token L2 norm of the perturbation.
        eps_init (`float`, *optional*, defaults to `0.01`):
            Initial per-token L2 norm; must lie strictly between `eps_min` and `eps_max`.
        sites (`list[str]`, *optional*, defaults to `["understanding", "generation"]`):
            Where the perturbation acts: on the visual tokens of the understanding path, on the embeddings of the
            sampled image tokens fed back during generation, or both.
        budget (`str`, *optional*, defaults to `"absolute"`):
            `"absolute"`: each token's perturbation has L2 norm `eps` (the paper). `"relative"`: norm `eps * ||z||`,
            a fraction of the token's own norm, so the same budget means the same thing for large and small tokens and
            survives the model's precision (bf16 keeps about 3 significant digits: fractions well above 0.004 survive).
        site_budgets (`dict`, *optional*):
            Per-site overrides, e.g. `{"generation": {"budget": "absolute", "eps_max": 0.02, "eps_min": 0.0}}`. A site
            not named uses `budget`, `eps_min`, `eps_max`. Every site shares the learnable fraction `sigmoid(rho)` of
            its own range `[eps_min, eps_max]`. The sites of a unified model can differ by an order of magnitude in
            token norm (for example, Janus's aligner output versus its generation aligner output). The generation
            site also takes `row_scales`, a list of positive factors on its budget for the first rows of the generated
            token grid (`[4.0]`: four times the budget on the first row; later rows 1): the first rows decide where
            the drawing starts, so a larger budget there lets the perturbation move it. Outside image generation (no
            grid rows known) the factor is 1.
        inputs (`str`, *optional*, defaults to `"features"`):
            What the MLP reads per token. `"features"`: the visual token alone (the paper, the authors' code): the
            perturber can only learn a perturbation shared by every image. `"features_and_gradient"`: the token and
            the gradient of U's loss at that token, normalised per token (`concat(z, g / ||g||)`, after "Learning to
            Defend by Learning to Attack", Jiang et al. 2021): a sample-specific ascent direction within the same
            budget. Where no gradient is given (the generation site, which has no loss while sampling), the gradient
            channel is zero. `"gradient"`: no MLP and nothing that learns: the perturbation is the normalised gradient at
            the whole budget `eps_max` (token-space adversarial training with one L2 fast-gradient step, the baseline
            a learned perturber is compared with); zero where no gradient is given.
        base_model_name_or_path (`str`, *optional*):
            The model this perturber was trained on, recorded in the model card.
    """

    hidden_size: int
    width: int | None = None
    depth: int = 3
    eps_max: float = 0.02
    eps_min: float = 0.0
    eps_init: float = 0.01
    sites: list[str] = field(default_factory=lambda: list(PERTURBER_SITES))
    budget: str = "absolute"
    site_budgets: dict | None = None
    inputs: str = "features"
    base_model_name_or_path: str | None = None

    def __post_init__(self):
        if not isinstance(self.hidden_size, int) or self.hidden_size <= 0:
            raise ValueError(f"`hidden_size` must be a positive integer, got {self.hidden_size!r}.")
        if self.width is None:
            self.width = self.hidden_size
        if self.width <= 0:
            raise ValueError(f"`width` must be a positive integer, got {self.width}.")
        if self.depth < 1:
            raise ValueError(f"`depth` must be at least 1, got {self.depth}.")
        if not 0 <= self.eps_min < self.eps_max:
            raise ValueError(f"Need 0 <= eps_min < eps_max, got eps_min={self.eps_min} and eps_max={self.eps_max}.")
        if not self.eps_min < self.eps_init < self.eps_max:
            raise ValueError(
                f"`eps_init` must lie strictly between eps_min={self.eps_min} and eps_max={self.eps_max}, "
                f"got {self.eps_init}."
            )
        self.sites = list(self.sites)
        unknown = [s for s in self.sites if s not in PERTURBER_SITES]
        if unknown or not self.sites:
            raise ValueError(f"`sites` must be a non-empty subset of {list(PERTURBER_SITES)}, got {self.sites}.")
        if self.budget not in BUDGETS:
            raise ValueError(f"`budget` must be one of {list(BUDGETS)}, got {self.budget!r}.")
        if self.inputs not in PERTURBER_INPUTS:
            raise ValueError(f"`inputs` must be one of {list(PERTURBER_INPUTS)}, got {self.inputs!r}.")
        self.site_budgets = {k: dict(v) for k, v in (self.site_budgets or {}).items()} or None
        for site, override in (self.site_budgets or {}).items():
            if site not in PERTURBER_SITES:
                raise ValueError(f"`site_budgets` names an unknown site {site!r}; sites: {list(PERTURBER_SITES)}.")
            allowed = {"budget", "eps_min", "eps_max"} | ({"row_scales"} if site == "generation" else set())
            unknown = set(override) - allowed
            if unknown:
                raise ValueError(
                    f"`site_budgets[{site!r}]` has unknown keys {sorted(unknown)}: use {', '.join(sorted(allowed))}."
                )
            if "row_scales" in override:
                scales = override["row_scales"]
                if (
                    not isinstance(scales, (list, tuple))
                    or not scales
                    or not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in scales)
                ):
                    raise ValueError(
                        f"`site_budgets['generation']['row_scales']` must be a list of finite numbers > 0 (a factor "
                        f"per row of the generated token grid, e.g. [4.0]), got {scales!r}."
                    )
                override["row_scales"] = [float(v) for v in scales]
            budget, low, high = self.site_budget(site)
            if budget not in BUDGETS:
                raise ValueError(f"`site_budgets[{site!r}]['budget']` must be one of {list(BUDGETS)}, got {budget!r}.")
            if not 0 <= low < high:
                raise ValueError(f"`site_budgets[{site!r}]` needs 0 <= eps_min < eps_max, got {low} and {high}.")

    def row_scales(self, site: str) -> list[float] | None:
        """The budget factors of a site's first grid rows (`site_budgets[site]["row_scales"]`), or `None`."""
        return (self.site_budgets or {}).get(site, {}).get("row_scales")

    def site_budget(self, site: str) -> tuple[str, float, float]:
        """`(budget, eps_min, eps_max)` of a site, with the per-site overrides applied."""
        override = (self.site_budgets or {}).get(site, {})
        return (
            override.get("budget", self.budget),
            float(override.get("eps_min", self.eps_min)),
            float(override.get("eps_max", self.eps_max)),
        )


class Perturber(
    nn.Module,
    PyTorchModelHubMixin,
    library_name="trl-unigame",
    tags=["trl", "unigame", "perturber"],
    paper_url=PAPER_URL,
    license="apache-2.0",
):
    r"""
    The adversary of UniGame: a per-token MLP whose output direction, scaled to a learnable norm `eps`, is added to
    the visual tokens at the shared interface.

    `delta = eps * normalize(MLP(z))` for every visual token `z`, with
    `eps = eps_min + (eps_max - eps_min) * sigmoid(rho)` (`budget="relative"`: `delta = eps * ||z|| * normalize(MLP(z))`;
    each site may have its own budget, see [`PerturberConfig`]). The perturbation is computed and added in float32,
    then cast back to the model's dtype. The cast can still round a small perturbation of a large token away: with
    `measuring()`, the perturber records at each site what actually reached the model (`last_measurements`).

    The perturber is not a submodule of the model: [`~Perturber.attach`] registers forward hooks on the interface's
    sites, so it lives beside a PEFT LoRA adapter on the same model and saves to its own folder.

    Args:
        config ([`PerturberConfig`]):
            The perturber's configuration.

    Example:

    ```python
    >>> from trl_unigame import Perturber
    >>> perturber = Perturber.for_model(model).attach(model)
    >>> with perturber.active():
    ...     adversarial_logits = model(**inputs).logits
    >>> perturber.save_pretrained("my-perturber")
    ```
    """

    def __init__(self, config: PerturberConfig):
        super().__init__()
        if isinstance(config, dict):
            config = PerturberConfig(**config)
        self.config = config
        width = config.width
        reads = 2 if config.inputs == "features_and_gradient" else 1
        dims = [reads * config.hidden_size] + [width] * (config.depth - 1) + [config.hidden_size]
        layers = []
        for i in range(config.depth if config.inputs != "gradient" else 0):
            last = i == config.depth - 1
            layers.append(nn.Linear(dims[i], dims[i + 1], bias=not last))
            if not last:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        if len(self.mlp):
            nn.init.orthogonal_(self.mlp[-1].weight)
        fraction = (config.eps_init - config.eps_min) / (config.eps_max - config.eps_min)
        self.rho = nn.Parameter(torch.tensor(math.log(fraction / (1 - fraction))))
        if self.config.inputs == "features_and_gradient":
            # The direction starts as the normalised gradient (an L2 fast-gradient step) plus the MLP's output; the
            # perturber learns how much of each to keep.
            self.gradient_gain = nn.Parameter(torch.tensor(1.0))
        self._gradients: dict[str, torch.Tensor] = {}
        self._row_tables: dict[tuple, torch.Tensor] = {}  # the generation site's row factors, per device
        self._handles: list = []
        self.enabled = True
        self.record_deltas = False
        self.last_deltas: list[torch.Tensor] = []
        self.measure = False
        self.last_measurements: dict[str, dict[str, float]] = {}
        self._measured: dict[str, tuple[torch.Tensor, str]] = {}  # per site: on-device sums inside `measuring()`

    # --------------------------------------------------------------------------------------------------- math
    def site_eps_tensor(self, site: str = "understanding") -> torch.Tensor:
        """The budget `eps` of a site as a tensor with its graph (an L2 norm, or a fraction of the token's norm)."""
        _, low, high = self.config.site_budget(site)
        if self.fixed_step:  # one fast-gradient step of the whole budget: nothing learns
            return torch.full_like(self.rho, high).detach()
        eps = low + (high - low) * torch.sigmoid(self.rho)
        # float32 rounding can step just outside the bounds when sigmoid saturates
        return eps.clamp(low, high)

    @property
    def eps_tensor(self) -> torch.Tensor:
        """The understanding site's budget `eps` as a tensor (see `site_eps_tensor`)."""
        return self.site_eps_tensor("understanding")

    @property
    def eps(self) -> float:
        """The understanding site's current budget: a per-token norm, or a fraction of the token's norm."""
        _, low, high = self.config.site_budget("understanding")
        return min(max(float(self.eps_tensor.detach()), low), high)

    @property
    def sees_gradient(self) -> bool:
        """Whether the perturbation reads U's loss gradient at each token (`config.inputs` is
        `"features_and_gradient"` or `"gradient"`)."""
        return self.config.inputs in ("features_and_gradient", "gradient")

    @property
    def fixed_step(self) -> bool:
        """Whether this is the fixed fast-gradient step (`config.inputs="gradient"`): no MLP, the whole budget."""
        return self.config.inputs == "gradient"

    def delta(
        self,
        tokens: torch.Tensor,
        site: str = "understanding",
        gradient: torch.Tensor | None = None,
        row_factor: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The perturbation (float32) for `tokens` of shape `(..., hidden_size)` at `site`: each token's L2 norm equals
        the site's `eps` (absolute budget) or `eps * ||token||` (relative budget), times `row_factor` (one factor per
        token, `tokens.shape[:-1]`) when given."""
        if tokens.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"The perturber has hidden_size {self.config.hidden_size} but the visual tokens have width "
                f"{tokens.shape[-1]}: build it for this model with `Perturber.for_model(model)`."
            )
        weight = self.mlp[0].weight if len(self.mlp) else self.rho
        features = tokens.to(device=weight.device, dtype=weight.dtype)
        if self.fixed_step:
            direction = torch.zeros_like(features) if gradient is None else gradient.detach().to(features)
        elif self.sees_gradient:
            if gradient is None:  # no loss to differentiate here (the generation site): a zero gradient channel
                unit = torch.zeros_like(features)
            else:
                unit = F.normalize(gradient.detach().to(features), dim=-1, eps=1e-12)
            direction = self.mlp(torch.cat([features, unit], dim=-1)) + self.gradient_gain * unit
        else:
            direction = self.mlp(features)
        scale = self.site_eps_tensor(site)
        if self.config.site_budget(site)[0] == "relative":
            scale = scale * tokens.detach().float().norm(dim=-1, keepdim=True).to(weight.device)
        if row_factor is not None:
            scale = scale * row_factor.to(device=weight.device, dtype=torch.float32).unsqueeze(-1)
        return scale * F.normalize(direction.float(), dim=-1, eps=1e-12)

    def forward(
        self,
        tokens: torch.Tensor,
        site: str = "understanding",
        gradient: torch.Tensor | None = None,
        row_factor: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Returns `tokens + delta(tokens)`, added in float32 and cast back to the dtype of `tokens`."""
        delta = self.delta(tokens, site, gradient, row_factor)
        if self.record_deltas:
            self.last_deltas.append(delta)
        perturbed = (tokens.float() + delta.to(tokens.device)).to(tokens.dtype)
        if self.measure:
            self._measure(site, tokens, delta, perturbed)
        return perturbed

    @torch.no_grad()
    def _measure(
        self,
        site: str,
        tokens: torch.Tensor,
        delta: torch.Tensor,
        perturbed: torch.Tensor,
        mask: torch.Tensor | None = None,
    ) -> None:
        """Adds to the site's sums, on the device, what reached the model after the cast on a sample of tokens (the
        first `MEASURED_TOKENS` positions, those of them in `mask` when given): the norms of the realized and the
        intended perturbation, their cosine, the tokens' median norm (weighted by the tokens measured) and the count.
        Nothing is read back to the host here: this runs at every generated token."""
        flat = lambda t: t.detach().reshape(-1, t.shape[-1])[:MEASURED_TOKENS].float()  # noqa: E731
        z, intended, reached = flat(tokens), flat(delta).to(tokens.device), flat(perturbed)
        realized = reached - z
        cosine = F.cosine_similarity(realized, intended, dim=-1, eps=1e-30)
        norms = z.norm(dim=-1)
        if mask is None:
            counted = torch.ones_like(norms, dtype=torch.bool)
            median = norms.median()
        else:
            counted = mask.detach().reshape(-1)[:MEASURED_TOKENS].to(norms.device)
            median = torch.where(counted, norms, float("nan")).nanmedian()
        count = counted.sum().float()
        kept = lambda values: torch.where(counted, values, 0.0).sum()  # noqa: E731
        sums = torch.stack(
            [
                kept(realized.norm(dim=-1)),
                kept(intended.norm(dim=-1)),
                kept(cosine),
                torch.where(count > 0, median, 0.0) * count,  # no token measured: nanmedian is nan
                count,
            ]
        )
        running = self._measured.get(site)
        self._measured[site] = (sums if running is None else running[0] + sums, str(tokens.dtype))

    @contextlib.contextmanager
    def measuring(self):
        """Context manager that records, at each site the perturbation acts on inside it, what reached the model after
        the cast to its dtype, over every call of the site inside it, on up to `MEASURED_TOKENS` tokens per call.

        On exit, `last_measurements[site]` (the dictionary it yields) holds the means over the measured tokens of
        `realized_delta_norm`, `intended_delta_norm` and `realized_delta_cosine`, `token_norm` (each call's median
        token norm, weighted by its tokens) and the tokens' `dtype`; a site that measured no token is left out. The
        sums stay on the device while the context runs and are read once on exit (a generation loop calls the site at
        every token: no host read there)."""
        self.last_measurements, self.measure, self._measured = {}, True, {}
        try:
            yield self.last_measurements
            for site, (sums, dtype) in self._measured.items():
                realized, intended, cosine, token_norm, count = sums.tolist()  # the one read per site
                if count:
                    self.last_measurements[site] = {
                        "realized_delta_norm": realized / count,
                        "intended_delta_norm": intended / count,
                        "realized_delta_cosine": cosine / count,
                        "token_norm": token_norm / count,
                        "dtype": dtype.replace("torch.", ""),
                    }
        finally:
            self.measure, self._measured = False, {}

    def num_parameters(self, only_trainable: bool = False) -> int:
        """Number of parameters of the perturber."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not only_trainable)

    # ---------------------------------------------------------------------------------------------- attaching
    @classmethod
    def for_model(cls, model: nn.Module, **overrides) -> "Perturber":
        """Builds a perturber sized for `model` (any model with a known visual interface).

        Args:
            model (`torch.nn.Module`): The unified model, plain or PEFT-wrapped.
            **overrides: Fields of [`PerturberConfig`] to set.
        """
        interface = get_interface(model)
        from .model_card import base_model_name  # (model_card imports this module)

        # A Hub id, or the folder's name: never an absolute local path, which means nothing on another machine.
        name = base_model_name(getattr(interface.base_model, "name_or_path", None))
        overrides.setdefault("base_model_name_or_path", name)
        if not interface.can_generate:
            # An understanding-only model has no generation site: the perturber acts where the model has one.
            sites = [s for s in overrides.get("sites", PERTURBER_SITES) if s != "generation"]
            overrides["sites"] = sites or ["understanding"]
        perturber = cls(PerturberConfig(hidden_size=interface.hidden_size, **overrides))
        param = next(interface.base_model.parameters())
        return perturber.to(param.device)

    def attach(self, model: nn.Module) -> "Perturber":
        """Registers the perturbation on the model's interface sites (see `config.sites`). Returns `self`.

        A site the model lacks (the generation site of an understanding-only VLM) is skipped. Where the interface
        gives a [`~VisualTokenInterface.site_mask`], only the masked positions of the site's output are perturbed.

        Raises:
            UnsupportedModelError: when the model has no known visual interface.
            ValueError: when the model's hidden size differs from the perturber's, or it has none of its sites.
        """
        interface = get_interface(model)
        if interface.hidden_size != self.config.hidden_size:
            raise ValueError(
                f"This perturber was built for hidden size {self.config.hidden_size}, but the model's visual tokens "
                f"have hidden size {interface.hidden_size}. Load a perturber trained for this model or build one with "
                "`Perturber.for_model(model)`."
            )
        sites = {"understanding": interface.understanding_site, "generation": interface.generation_site}
        present = [name for name in self.config.sites if sites[name] is not None]
        if not present:
            raise ValueError(
                f"This perturber acts at {self.config.sites}, but {type(interface.base_model).__name__} has no such "
                "site (it cannot generate images): build one with `sites=['understanding']`."
            )
        self.detach()
        for name in present:
            hook = functools.partial(self._hook, site=name, mask_fn=interface.site_mask(name))
            self._handles.append(sites[name].register_forward_hook(hook))
        return self

    def detach(self) -> "Perturber":
        """Removes the hooks: the model behaves exactly as without a perturber. Returns `self`."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        return self

    @property
    def is_attached(self) -> bool:
        return bool(self._handles)

    def _hook(self, module, args, output, site: str = "understanding", mask_fn=None):
        if not self.enabled:
            return output
        mask = mask_fn(module, args, output) if mask_fn is not None else None
        gradient = self._gradients.get(site)
        if gradient is not None and gradient.shape != output.shape:
            gradient = None  # given for another call of the site (another batch): this call has none
        factor = self._row_factor(site, output)
        if mask is None:
            return self(output, site, gradient, factor)
        if not (torch.is_grad_enabled() or self.record_deltas):
            # No graph to keep (image generation, at every token): every position is computed and only the visual
            # ones kept, where selecting them would read the mask back to the host.
            delta = self.delta(output, site, gradient, factor)
            perturbed = (output.float() + delta.to(output.device)).to(output.dtype)
            if self.measure:
                self._measure(site, output, delta, perturbed, mask)
            return torch.where(mask.unsqueeze(-1), perturbed, output)
        if not mask.any():
            return output
        # Only the visual-token positions are perturbed (and recorded); the others pass through unchanged.
        perturbed = output.clone()
        perturbed[mask] = self(
            output[mask], site, None if gradient is None else gradient[mask], None if factor is None else factor[mask]
        )
        return perturbed

    def _row_factor(self, site: str, output: torch.Tensor) -> torch.Tensor | None:
        """The budget factor of each position of `output` (`output.shape[:-1]`) from the site's `row_scales` and the
        grid rows of the image tokens being fed back; `None` without row scales or outside image generation."""
        scales = self.config.row_scales(site)
        rows = current_generation_rows() if scales else None
        if rows is None:
            return None
        # Made once per site and device: a copy to the device at every generated token would stall the loop.
        key = (site, output.device)
        table = self._row_tables.get(key)
        if table is None:
            table = self._row_tables[key] = torch.tensor([*scales, 1.0], device=output.device)
        return torch.broadcast_to(table[rows.to(table.device).clamp(max=len(scales))], output.shape[:-1])

    @contextlib.contextmanager
    def gradients(self, **by_site: torch.Tensor | None):
        """Context manager that gives a gradient-reading perturber U's loss gradient at a site's output, e.g.
        `with perturber.gradients(understanding=g):` with `g` shaped like the site's output. A call of the site whose
        output has another shape reads a zero gradient channel, as does a site given none."""
        previous = dict(self._gradients)
        self._gradients.update(by_site)  # `None` for a site: no gradient there, whatever an outer context gave
        try:
            yield self
        finally:
            self._gradients = previous

    @contextlib.contextmanager
    def active(self, enabled: bool = True):
        """Context manager that turns the perturbation on (or off with `enabled=False`) and restores the old state."""
        previous = self.enabled
        self.enabled = enabled
        try:
            yield self
        finally:
            self.enabled = previous

    def disabled(self):
        """Context manager that turns the perturbation off."""
        return self.active(False)

    @contextlib.contextmanager
    def recording(self):
        """Context manager that keeps the deltas computed inside it in `last_deltas` (with their graph)."""
        self.last_deltas, self.record_deltas = [], True
        try:
            yield self.last_deltas
        finally:
            self.record_deltas = False

    def _inputs_text(self) -> str:
        if self.fixed_step:
            return 'nothing: the perturbation is the normalised gradient of the model\'s loss (`inputs="gradient"`)'
        if self.sees_gradient:
            return 'each visual token and the gradient of the model\'s loss at that token (`inputs="features_and_gradient"`)'
        return 'each visual token alone (`inputs="features"`, the paper\'s perturber)'

    def _budget_text(self) -> str:
        parts = []
        for site in self.config.sites:
            budget, _, high = self.config.site_budget(site)
            what = f"L2 norm at most {high}" if budget == "absolute" else f"L2 norm at most {high} x the token's norm"
            scales = self.config.row_scales(site)
            if scales:
                what += f", times {scales} on the first rows of the generated token grid"
            parts.append(f"{site} site: per-token {what}")
        return "; ".join(parts)

    # ------------------------------------------------------------------------------------------ save and load
    def _save_pretrained(self, save_directory: Path) -> None:
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(save_directory / "model.safetensors"), metadata={"format": "pt"})

    def save_pretrained(self, save_directory, **kwargs):
        """Writes `config.json`, `model.safetensors` and a model card `README.md` to `save_directory`.

        Accepts the keyword arguments of `huggingface_hub.ModelHubMixin.save_pretrained` (e.g. `push_to_hub=True`).
        """
        save_directory = Path(save_directory)
        (save_directory / "README.md").unlink(missing_ok=True)  # the card reflects the current config
        kwargs["config"] = self.config
        return super().save_pretrained(save_directory, **kwargs)

    @classmethod
    def _from_pretrained(cls, *, model_id, revision, cache_dir, force_download, local_files_only, token, **kwargs):
        from huggingface_hub import hf_hub_download
        from safetensors.torch import load_file

        map_location = kwargs.pop("map_location", "cpu")
        subfolder = kwargs.pop("subfolder", None)
        kwargs.pop("config", None)  # read below from the perturber's own folder
        if os.path.isdir(model_id):
            folder = os.path.join(model_id, subfolder) if subfolder else model_id
            config_file = os.path.join(folder, "config.json")
            weights_file = os.path.join(folder, "model.safetensors")
            if not os.path.isfile(weights_file):
                raise FileNotFoundError(
                    f"No perturber in {folder} (no model.safetensors). A UniGame output keeps it in its "
                    "`perturber/` folder: pass that folder, or `subfolder='perturber'`."
                )
        else:
            download = dict(
                revision=revision,
                cache_dir=cache_dir,
                force_download=force_download,
                local_files_only=local_files_only,
                token=token,
                subfolder=subfolder,
            )
            config_file = hf_hub_download(model_id, "config.json", **download)
            weights_file = hf_hub_download(model_id, "model.safetensors", **download)
        with open(config_file) as f:
            config = PerturberConfig(**json.load(f))
        perturber = cls(config)
        perturber.load_state_dict(load_file(weights_file, device=str(map_location)))
        return perturber

    def generate_model_card(self, *args, **kwargs) -> ModelCard:
        """The model card: base model, tags, configuration and the paper's citation."""
        name = self.config.base_model_name_or_path
        data = ModelCardData(
            library_name="trl-unigame",
            license="apache-2.0",
            tags=["trl", "unigame", "perturber", "adversarial-training", "multimodal"],
            # Hub ids only (`namespace/name`): a folder's name is no model on the Hub, which refuses such metadata.
            base_model=name if name and "/" in name and not os.path.isabs(name) else None,
        )
        config = json.dumps(asdict(self.config), indent=2, sort_keys=True)
        content = f"""---
{data.to_yaml()}
---

# UniGame perturber

A perturber trained with [UniGame]({PAPER_URL}) self-adversarial post-training
{f"on `{self.config.base_model_name_or_path}`" if self.config.base_model_name_or_path else ""}. It perturbs the
model's visual tokens at the shared visual-token interface ({self._budget_text()}); {self.num_parameters():,}
parameters. Its MLP reads {self._inputs_text()}.

## Usage

```python
from trl_unigame import Perturber

perturber = Perturber.from_pretrained("<this repo or folder>").attach(model)
with perturber.active():
    outputs = model(**inputs)
```

## Configuration

```json
{config}
```

## Citation

```bibtex
{CITATION}
```
"""
        return ModelCard(content)
