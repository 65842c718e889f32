"""MoCa: modality-aware continual pre-training makes bidirectional multimodal embedding models.

The checkpoint's remote code (`configuration_moca`, `modeling_moca`, `processing_moca`,
`sentence_transformers_moca`, `model_card`) is what loading and encoding need; `moca.data` loads data of every
stage; `moca.training` holds both training stages; `moca.cli` embeds and searches.
"""

from .configuration_moca import MoCaConfig
from .modeling_moca import MoCaModel, MoCaModelOutput
from .processing_moca import InputError, MoCaProcessor, format_prompt, load_image

__all__ = ["InputError", "MoCaConfig", "MoCaModel", "MoCaModelOutput", "MoCaProcessor", "format_prompt", "load_image"]
