"""UniGame self-adversarial post-training for unified multimodal models, on transformers, TRL and PEFT."""

__version__ = "0.1.0"

from .buffer import HardSample, HardSampleBuffer
from .consistency import CLIPConsistencyScorer
from .data import UniGameDataCollator
from .evaluation import UniGameEvaluator
from .interfaces import (
    JanusInterface,
    UnsupportedModelError,
    VisualTokenInterface,
    get_interface,
    register_interface,
)
from .perturber import Perturber, PerturberConfig
from .selection import select_hard_candidates
from .stacking import UniGameDPOConfig, UniGameDPOTrainer, UniGameSFTConfig, UniGameSFTTrainer
from .unigame_config import UniGameArguments, UniGameConfig
from .unigame_trainer import UniGameMixin, UniGameTrainer


__all__ = [
    "CLIPConsistencyScorer",
    "HardSample",
    "HardSampleBuffer",
    "JanusInterface",
    "Perturber",
    "PerturberConfig",
    "UniGameArguments",
    "UniGameConfig",
    "UniGameDPOConfig",
    "UniGameDPOTrainer",
    "UniGameSFTConfig",
    "UniGameSFTTrainer",
    "UniGameDataCollator",
    "UniGameEvaluator",
    "UniGameMixin",
    "UniGameTrainer",
    "UnsupportedModelError",
    "VisualTokenInterface",
    "get_interface",
    "register_interface",
    "select_hard_candidates",
]
