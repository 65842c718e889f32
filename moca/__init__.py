"""MoCa: modality-aware continual pre-training makes bidirectional multimodal embedding models."""

from .configuration_moca import MoCaConfig
from .modeling_moca import MoCaContinualPretrainingOutput, MoCaForContinualPretraining, MoCaModel, MoCaModelOutput
from .processing_moca import MoCaProcessor, format_prompt

__all__ = [
    "MoCaConfig",
    "MoCaContinualPretrainingOutput",
    "MoCaForContinualPretraining",
    "MoCaModel",
    "MoCaModelOutput",
    "MoCaProcessor",
    "format_prompt",
]
