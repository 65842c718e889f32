"""What a model and an input are, as short hashes: resumed work and caches are only reused for the same ones.

`moca embed` keys its saved chunks and its index on these, `eval` its embedding cache.
"""

import hashlib
import json
from pathlib import Path

import torch


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash that changes when the model's config, processor settings or weights change.

    Hashing every weight of a 7B model would take seconds per run, so each tensor contributes its name, shape,
    dtype and its first and last 256 values: any training step changes those.
    """
    digest = hashlib.blake2b(digest_size=8)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        settings = json.loads(config.to_json_string(use_diff=False))
        for where_it_came_from in ("_name_or_path", "architectures", "auto_map", "transformers_version"):
            settings.pop(where_it_came_from, None)  # a moved or re-saved checkpoint embeds the same way
        digest.update(json.dumps(settings, sort_keys=True).encode())
    image_processor = getattr(getattr(model, "processor", None), "image_processor", None)
    if image_processor is not None and hasattr(image_processor, "to_json_string"):
        digest.update(image_processor.to_json_string().encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = torch.cat([flat[:256], flat[-256:]]).cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(sample.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def file_stamp(path: Path) -> str:
    """Stands for a file's content without reading it: its size and modification time."""
    stat = Path(path).stat()
    return f"{stat.st_size}|{stat.st_mtime_ns}"
