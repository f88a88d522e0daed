"""Model card of a UniGame run: base model (and the code that loads it), dataset, tags, the consistency scorer, the
game's configuration and the paper's citation."""

from __future__ import annotations

import json
import os

from huggingface_hub import ModelCard, ModelCardData

from .perturber import CITATION, PAPER_URL


#: The code that loads the tiny digits Janus shipped in the package, as a card's usage snippet shows it.
SHIPPED_TINY_JANUS_CODE = (
    "from trl_unigame.testing import pretrained_tiny_janus\n\n"
    "base, _ = pretrained_tiny_janus()  # the tiny digits Janus shipped with trl-unigame"
)


def hub_repo_id(name: str | None) -> str | None:
    r"""
    `name` when it can be a Hub repository id (`"deepseek-community/Janus-Pro-1B"`), else `None`: a local path (one that
    exists, or one written as a path: starting with `/`, `.` or `~`, or with more than one `/`), a packaged `datasets`
    builder (`"imagefolder"`, `"parquet"`, ...) or nothing. A card links and records in its metadata only such ids.

    Args:
        name (`str` or `None`): A model or dataset name as a run was given it.
    """
    if not name or os.path.exists(name) or name.startswith(("/", ".", "~")):
        return None
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    try:
        from datasets.packaged_modules import _PACKAGED_DATASETS_MODULES as builders
    except ImportError:  # private in `datasets`: the common builders
        builders = {"arrow", "csv", "imagefolder", "json", "pandas", "parquet", "text", "webdataset"}
    return None if name in builders else name


def base_model_name(name_or_path: str | None) -> str | None:
    r"""
    How a card names a base model in its text: its Hub id, else the name of its folder (never an absolute local path,
    which means nothing on another machine). Only a Hub id belongs in a card's metadata ([`hub_repo_id`]).

    Args:
        name_or_path (`str` or `None`): The base model's `config._name_or_path` (or a perturber's
            `base_model_name_or_path`).

    Returns:
        `str` or `None`: The Hub id, the folder's name, or `None` for a model with no name (built in code).
    """
    if not name_or_path:
        return None
    return hub_repo_id(name_or_path) or os.path.basename(os.path.normpath(name_or_path)) or None


def base_model_reference(name_or_path: str | None) -> tuple[str | None, str | None]:
    r"""
    How a card names a base model: its Hub id (for the card's metadata) and the Python code that loads it as `base`.

    Args:
        name_or_path (`str` or `None`):
            The base model's `config._name_or_path`: a Hub id, a local folder, or empty for a model built in code.

    Returns:
        `tuple[str | None, str | None]`: `(hub_id, code)`. A Hub id is loaded with
        `AutoModelForImageTextToText.from_pretrained`; the tiny digits Janus shipped in the package by
        `trl_unigame.testing.pretrained_tiny_janus()` (no Hub id); another local folder by its absolute path (no Hub
        id); a model with no name, or whose folder no longer exists (a temporary one), gives `(None, None)`: nothing
        can load it.
    """
    if not name_or_path:
        return None, None
    if os.path.isdir(name_or_path):
        from .testing.digits_janus import pretrained_tiny_janus_path

        if os.path.realpath(name_or_path) == os.path.realpath(pretrained_tiny_janus_path()):
            return None, SHIPPED_TINY_JANUS_CODE
        path = os.path.abspath(name_or_path)
        return None, f"base = AutoModelForImageTextToText.from_pretrained({json.dumps(path)})  # a local folder"
    hub_id = hub_repo_id(name_or_path)
    if hub_id is None:
        return None, None
    return hub_id, f"base = AutoModelForImageTextToText.from_pretrained({json.dumps(hub_id)})"


def describe_consistency_scorer(scorer) -> str | None:
    r"""
    Names the consistency scorer a run used: the CLIP checkpoint of a [`CLIPConsistencyScorer`], else the import path
    of the scorer's class (or function), e.g. `trl_unigame.digit_judge.DigitJudge`; `None` when there was none.

    Args:
        scorer (`Callable` or `None`): The trainer's `consistency_scorer`.
    """
    if scorer is None:
        return None
    from .consistency import CLIPConsistencyScorer

    if isinstance(scorer, CLIPConsistencyScorer):
        return f"CLIP {getattr(scorer.model, 'name_or_path', None) or '(a model built in code)'}"
    named = scorer if hasattr(scorer, "__qualname__") else type(scorer)
    return f"{named.__module__}.{named.__qualname__}"


#: Why a card's snippet loads the adapter inside `warnings.catch_warnings()`, and the one warning it filters.
PEFT_READS_DEPRECATED_PROPERTY = "PEFT reads `is_gradient_checkpointing`, which transformers 5 deprecates"
GRADIENT_CHECKPOINTING_WARNING = ".*is_gradient_checkpointing"


def load_snippet(model_path: str, base_model_code: str | None, adapter: bool = True) -> str:
    r"""
    The Python code that loads a saved UniGame folder: the base model and the LoRA adapter (or the full model), the
    processor and the perturber.

    Args:
        model_path (`str`): Hub id or folder of the saved model.
        base_model_code (`str` or `None`): Code that loads the base model as `base` ([`base_model_reference`]).
        adapter (`bool`, *optional*, defaults to `True`): Whether the folder holds a LoRA adapter (else a full model).
    """
    base_lines = [] if base_model_code is None else [line for line in base_model_code.splitlines() if line.strip()]
    base_imports = [line for line in base_lines if line.startswith(("from ", "import "))]
    base_body = [line for line in base_lines if line not in base_imports]
    lines = ["import warnings", "", "from peft import PeftModel"] if adapter else []
    needs_auto_model = not adapter or any("AutoModelForImageTextToText" in line for line in base_body)
    lines.append(
        "from transformers import AutoModelForImageTextToText, AutoProcessor"
        if needs_auto_model
        else "from transformers import AutoProcessor"
    )
    lines += ["from trl_unigame import Perturber", *base_imports, ""]
    if adapter:
        lines += base_body or [
            "base = ...  # the base model this adapter was trained on: it was built in code, not saved"
        ]
        lines += [
            f"with warnings.catch_warnings():  # {PEFT_READS_DEPRECATED_PROPERTY}",
            f'    warnings.filterwarnings("ignore", "{GRADIENT_CHECKPOINTING_WARNING}", FutureWarning)',
            f"    model = PeftModel.from_pretrained(base, {json.dumps(model_path)})",
        ]
    else:
        lines.append(f"model = AutoModelForImageTextToText.from_pretrained({json.dumps(model_path)})")
    # A folder's perturber by its own folder: `subfolder=` would first look for a `config.json` beside the adapter
    # (and log "config.json not found"); on the Hub the perturber is a subfolder of the repository.
    perturber_source = (
        json.dumps(model_path.rstrip("/") + "/perturber")
        if os.path.isdir(model_path)
        else f'{json.dumps(model_path)}, subfolder="perturber"'
    )
    lines += [
        f"processor = AutoProcessor.from_pretrained({json.dumps(model_path)})",
        "# Optional: the adversary, e.g. to probe robustness",
        f"perturber = Perturber.from_pretrained({perturber_source}).attach(model)",
    ]
    return "\n".join(lines)


def unigame_model_card(
    model_name: str,
    base_model: str | None,
    dataset_name: str | None,
    tags: list[str],
    unigame_config: dict,
    trainer_name: str = "UniGame",
    base_model_code: str | None = None,
    model_path: str | None = None,
    consistency_scorer: str | None = None,
    adapter: bool = True,
) -> ModelCard:
    r"""
    Builds the model card of a model post-trained with UniGame (LoRA adapter or full model, and `perturber/`).

    Args:
        model_name (`str`): The card's title.
        base_model (`str` or `None`):
            Hub id of the base model (the card's metadata and a link); `None` (or a local path) when it has none.
        dataset_name (`str` or `None`):
            Hub id of the training dataset; a `datasets` builder (`"imagefolder"`) or a local path is named in the
            text only, without a link or metadata.
        tags (`list[str]`): Tags; `trl` and `unigame` are always added.
        unigame_config (`dict`): The game's configuration, shown as JSON.
        trainer_name (`str`, *optional*, defaults to `"UniGame"`): The trainer class that trained the model.
        base_model_code (`str`, *optional*):
            Python code that loads the base model as `base`; defaults to `from_pretrained(base_model)` when
            `base_model` is given (see [`base_model_reference`]).
        model_path (`str`, *optional*): Hub id or folder the usage snippet loads from; defaults to `model_name`.
        consistency_scorer (`str`, *optional*):
            What scored the mined candidates ([`describe_consistency_scorer`]); `None` when nothing did.
        adapter (`bool`, *optional*, defaults to `True`): Whether the folder holds a LoRA adapter (else a full model).
    """
    if base_model_code is None and base_model:
        base_model_code = base_model_reference(base_model)[1]
    model_path = model_path or model_name
    # The metadata and the links name only what can be on the Hub: no local path, no `datasets` builder.
    base_model, hub_dataset = hub_repo_id(base_model), hub_repo_id(dataset_name)
    data = ModelCardData(
        library_name="peft" if adapter else "transformers",
        base_model=base_model,
        datasets=[hub_dataset] if hub_dataset else None,
        tags=sorted(set(tags) | {"trl", "unigame"}),
        license="apache-2.0",
        model_name=model_name,
    )
    if base_model:
        base = f"[`{base_model}`](https://huggingface.co/{base_model})"
    elif base_model_code == SHIPPED_TINY_JANUS_CODE:
        base = "the tiny digits Janus shipped with trl-unigame (`trl_unigame.testing.pretrained_tiny_janus()`)"
    else:
        base = "a unified multimodal model"
    if hub_dataset:
        dataset = f" on [`{hub_dataset}`](https://huggingface.co/datasets/{hub_dataset})"
    else:
        dataset = f" on `{os.path.basename(os.path.normpath(dataset_name))}`" if dataset_name else ""
    holds = "the LoRA adapter of the understanding player" if adapter else "the post-trained model"
    scorer = (
        f"Mined candidates were scored for consistency with their prompt by `{consistency_scorer}`."
        if consistency_scorer
        else "No consistency scorer filtered the mined candidates."
    )
    content = f"""---
{data.to_yaml()}
---

# {model_name}

This is {base} post-trained with [UniGame]({PAPER_URL}) self-adversarial post-training{dataset}, with
`{trainer_name}` from the `trl-unigame` library. The folder holds {holds} and, in
`perturber/`, the perturber that played against it. {scorer}

## Usage

```python
{load_snippet(model_path, base_model_code, adapter=adapter)}
```

## UniGame configuration

```json
{json.dumps(unigame_config, indent=2, sort_keys=True, default=str)}
```

## Citation

```bibtex
{CITATION}
```
"""
    return ModelCard(content)
