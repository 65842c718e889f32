"""MoCa: modality-aware continual pre-training makes bidirectional multimodal embedding models."""

from .configuration_moca import MoCaConfig
from .modeling_moca import MoCaModel, MoCaModelOutput
from .processing_moca import MoCaProcessor, format_prompt

__all__ = ["MoCaConfig", "MoCaModel", "MoCaModelOutput", "MoCaProcessor", "format_prompt"]
