"""Training MoCa: stage 1 (`cpt`: modality-aware continual pre-training) and stage 2 (`contrastive`:
heterogeneous contrastive fine-tuning), with what both share in `common`. Not part of a checkpoint's remote code."""
