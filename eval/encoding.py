"""Model loading and cached, resumable, multi-process encoding shared by the MMEB and ViDoRe evaluations."""

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from accelerate.utils import gather, parse_flag_from_env
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from moca.cli import DEFAULT_MAX_LENGTH, check_model_path, resolve_dtype, set_image_tokens
from moca.fingerprint import file_stamp, model_fingerprint  # noqa: F401 (eval's names for them)
from moca.modeling_moca import DTYPES

logger = logging.getLogger(__name__)

KEY_BYTES = 16


@dataclass
class EvalArguments:
    """The flags both benchmarks share (named as in the training scripts and the CLI)."""

    model_name_or_path: str = field(
        metadata={"help": "MoCa checkpoint: a local folder or a Hub name.", "aliases": ["--model"]}
    )
    output_dir: str = field(metadata={"help": "Where the results (json, md, png) and the embedding cache go."})
    batch_size: int = field(default=16, metadata={"help": "Inputs per forward pass."})
    max_length: int | None = field(
        default=DEFAULT_MAX_LENGTH,
        metadata={"help": "Longest input in tokens; longer text is cut (default: the training length); 0: no cut."},
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Embedding cache folder; OUTPUT_DIR/embedding_cache when not given."}
    )
    min_image_tokens: int | None = field(
        default=None, metadata={"help": "Fewest visual tokens per image (default: the checkpoint's bound)."}
    )
    max_image_tokens: int | None = field(
        default=None, metadata={"help": "Most visual tokens per image (default: the checkpoint's bound)."}
    )
    dtype: str | None = field(
        default="auto",
        metadata={"help": f"Weights dtype: auto (default: bfloat16 where the device computes it natively, GPUs and "
                          f"CPUs with AMX/AVX-512-BF16; float32 elsewhere) or one of {', '.join(DTYPES)}."},
    )
    trust_remote_code: bool = field(
        default=False,
        metadata={"help": "Load through the Python files shipped with the checkpoint instead of the installed moca "
                          "package (which loads every MoCa checkpoint itself)."},
    )

    def __post_init__(self):
        if self.max_length is not None and self.max_length < 0:
            raise ValueError(f"--max_length must be 0 (no cut) or positive, got {self.max_length}")
        self.max_length = self.max_length or None


def embedding_cache(model, output_dir, cache_dir=None, max_length: int | None = None) -> "EmbeddingCache":
    """The cache of one model's embeddings, apart for each `max_length` (a cut input has another embedding)."""
    folder = model_fingerprint(model) + (f"-max_length{max_length}" if max_length is not None else "")
    return EmbeddingCache(Path(cache_dir or Path(output_dir) / "embedding_cache") / folder)


def init_processes() -> PartialState:
    """Join the processes of an `accelerate launch` or `torchrun` job (one process alone: nothing to join).

    Without an accelerator, accelerate only joins processes when asked to run on CPU, through
    `ACCELERATE_USE_CPU=1` (e.g. `ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m eval.mmeb ...`).
    """
    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def load_model(
    name_or_path: str,
    dtype: str | None = None,
    device: str | torch.device | None = None,
    revision: str | None = None,
    image_tokens: tuple[int | None, int | None] = (None, None),
    trust_remote_code: bool = False,
):
    """Load a MoCa checkpoint (local folder or Hub name, at `revision`) in eval mode.

    The installed package's `MoCaModel` loads it unless `trust_remote_code`, which runs the checkpoint's own
    Python files instead (code from the checkpoint's author). `dtype`: "auto" (and None) is bfloat16 where the
    device computes it natively, float32 elsewhere (`moca.cli.resolve_dtype`); `device` to this process's device
    (one accelerator per process under `accelerate launch`).
    `image_tokens` overrides the (fewest, most) visual tokens per image the checkpoint's processor stores (`None`
    keeps a bound).
    """
    from transformers import PretrainedConfig
    from transformers.dynamic_module_utils import get_class_from_dynamic_module

    from moca.configuration_moca import is_moca_config_dict
    from moca.modeling_moca import MoCaModel

    check_model_path(name_or_path, "--model_name_or_path")
    # The config as plain JSON: reading the model type needs no code, remote or ours.
    config = PretrainedConfig.get_config_dict(name_or_path, revision=revision)[0]
    if not is_moca_config_dict(config):
        raise ValueError(
            f"{name_or_path} is a {config.get('model_type')!r} checkpoint, not a MoCa one (its config.json has no "
            "'moca' settings). Checkpoints of the original MoCa release convert with scripts/convert_original_checkpoint.py."
        )
    device = torch.device(device) if device is not None else PartialState().device
    dtype = resolve_dtype(dtype, device, name_or_path)
    if trust_remote_code:
        # Not `AutoModel(trust_remote_code=True)`: with this package imported, AutoModel picks the installed class.
        class_ref = config.get("auto_map", {}).get("AutoModel")
        if class_ref is None:
            raise ValueError(f"{name_or_path} ships no model code (no auto_map.AutoModel in its config.json).")
        model_class = get_class_from_dynamic_module(class_ref, name_or_path, revision=revision)
        model = model_class.from_pretrained(name_or_path, revision=revision, dtype=DTYPES[dtype])
    else:
        model = MoCaModel.from_pretrained(name_or_path, revision=revision, dtype=DTYPES[dtype])
    set_image_tokens(model, image_tokens, name=name_or_path)
    return model.to(device).eval()


def content_key(kind: str, *parts: str | bytes) -> bytes:
    """Identity of one input: what it is (`kind` names the prompt applied) and its content."""
    digest = hashlib.blake2b(kind.encode(), digest_size=KEY_BYTES)
    for part in parts:
        digest.update(b"\x00")
        digest.update(part if isinstance(part, bytes) else part.encode())
    return digest.digest()


class EmbeddingCache:
    """Embeddings on disk, one folder of safetensors shards per namespace, keyed by content hashes.

    A shard holds `keys` (n, 16) uint8 and `embeddings` (n, d) float32. Shards are written whole (to a temporary
    name, then renamed) as encoding proceeds, so a killed run loses at most the shard in progress.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    def _folder(self, namespace: str) -> Path:
        return self.directory / namespace.replace("/", "__")

    def load(self, namespace: str) -> dict[bytes, torch.Tensor]:
        found = {}
        for shard in sorted(self._folder(namespace).glob("shard-*.safetensors")):
            tensors = load_file(shard)
            for key, embedding in zip(tensors["keys"].numpy(), tensors["embeddings"]):
                found[key.tobytes()] = embedding
        return found

    def save(self, namespace: str, keys: Sequence[bytes], embeddings: torch.Tensor) -> None:
        folder = self._folder(namespace)
        folder.mkdir(parents=True, exist_ok=True)
        index = len(list(folder.glob("shard-*.safetensors")))
        path = folder / f"shard-{index:06d}.safetensors"
        temporary = path.with_suffix(".tmp")
        key_tensor = torch.frombuffer(bytearray(b"".join(keys)), dtype=torch.uint8).reshape(len(keys), KEY_BYTES)
        save_file({"keys": key_tensor, "embeddings": embeddings.float().contiguous()}, temporary)
        os.replace(temporary, path)


def _encode_shard(
    items: list[Any], encode_fn: Callable[[list[Any]], torch.Tensor], load_fn: Callable[[Any], Any]
) -> torch.Tensor:
    """Encode this process's share of `items` in one call, so that the model sorts the whole share into
    batches of similar cost; return all processes' embeddings in `items` order."""
    state = PartialState()
    with state.split_between_processes(items, apply_padding=True) as share:
        local = encode_fn([load_fn(item) for item in share]).float().cpu()
    if state.num_processes == 1:
        return local
    # `apply_padding` gives every process the same number of rows (the last item repeated), which `gather`
    # needs; the padding rows are dropped here, with the split rule of `split_between_processes`.
    gathered = gather(local.to(state.device)).cpu().reshape(state.num_processes, len(local), -1)
    per_process, extra = divmod(len(items), state.num_processes)
    real_rows = [per_process + (1 if rank < extra else 0) for rank in range(state.num_processes)]
    return torch.cat([gathered[rank, :rows] for rank, rows in enumerate(real_rows)])


def encode_with_cache(
    items: Sequence[Any],
    keys: Sequence[bytes],
    encode_fn: Callable[[list[Any]], torch.Tensor],
    *,
    cache: EmbeddingCache,
    namespace: str,
    load_fn: Callable[[Any], Any] = lambda item: item,
    shard_size: int = 256,
    description: str = "encoding",
) -> torch.Tensor:
    """Embeddings of `items` (one row per item, in order), encoding each distinct key once.

    Keys found in the cache are not encoded again. The rest is encoded in shards of `shard_size` items, split
    between the processes of an `accelerate launch`, gathered, and written to the cache by the main process (a
    killed run loses at most the shard in progress). `encode_fn` gets a process's share of a shard at once.
    `load_fn` turns an item into a model input right before its shard is encoded, so that large inputs (page
    images) are never all in memory. Every process returns the full result.
    """
    if len(items) != len(keys):
        raise ValueError(f"{len(items)} items but {len(keys)} keys")
    state = PartialState()
    # Every process must see the same cache (the main process may still be writing the previous shard).
    state.wait_for_everyone()
    known = cache.load(namespace)
    first_item_of_key = {}
    for item, key in zip(items, keys):
        first_item_of_key.setdefault(key, item)
    missing = [key for key in first_item_of_key if key not in known]
    if missing:
        logger.info(
            "%s: %d of %d distinct inputs to encode, on %d process(es)",
            namespace,
            len(missing),
            len(first_item_of_key),
            state.num_processes,
        )
    with tqdm(total=len(missing), desc=description, disable=not state.is_main_process or not missing) as progress:
        for start in range(0, len(missing), shard_size):
            shard_keys = missing[start : start + shard_size]
            embeddings = _encode_shard([first_item_of_key[key] for key in shard_keys], encode_fn, load_fn)
            if state.is_main_process:
                cache.save(namespace, shard_keys, embeddings)
            known.update(zip(shard_keys, embeddings))
            progress.update(len(shard_keys))
    if not keys:
        return torch.empty(0, 0)
    return torch.stack([known[key] for key in keys])
