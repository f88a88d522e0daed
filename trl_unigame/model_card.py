"""Model card of a UniGame run: base model, dataset, tags, the game's configuration and the paper's citation."""

from __future__ import annotations

import json

from huggingface_hub import ModelCard, ModelCardData

from .perturber import CITATION, PAPER_URL


def unigame_model_card(
    model_name: str,
    base_model: str | None,
    dataset_name: str | None,
    tags: list[str],
    unigame_config: dict,
    trainer_name: str = "UniGame",
) -> ModelCard:
    """Builds the model card of a model post-trained with UniGame (LoRA adapter + `perturber/`)."""
    data = ModelCardData(
        library_name="peft",
        base_model=base_model,
        datasets=[dataset_name] if dataset_name else None,
        tags=sorted(set(tags) | {"trl", "unigame"}),
        license="apache-2.0",
        model_name=model_name,
    )
    base = f"[`{base_model}`](https://huggingface.co/{base_model})" if base_model else "a unified multimodal model"
    dataset = f" on [`{dataset_name}`](https://huggingface.co/datasets/{dataset_name})" if dataset_name else ""
    content = f"""---
{data.to_yaml()}
---

# {model_name}

This is {base} post-trained with [UniGame]({PAPER_URL}) self-adversarial post-training{dataset}, with
{trainer_name} from [trl-unigame](https://github.com/trl-unigame/trl-unigame). The folder holds the LoRA adapter
of the understanding player and, in `perturber/`, the perturber that played against it.

## Usage

```python
from peft import PeftModel
from transformers import AutoModelForImageTextToText, AutoProcessor
from trl_unigame import Perturber

base = AutoModelForImageTextToText.from_pretrained("{base_model}")
model = PeftModel.from_pretrained(base, "{model_name}")
processor = AutoProcessor.from_pretrained("{model_name}")
# Optional: the adversary, e.g. to probe robustness
perturber = Perturber.from_pretrained("{model_name}", subfolder="perturber").attach(model)
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
