"""MoCa: a vision-language backbone turned into a bidirectional multimodal embedding model.

The backbone is the stock transformers model of the VLM (`Qwen2_5_VLModel`, `Qwen2VLModel`,
`Qwen3VLModel`), composed here, never copied: attention is made bidirectional through the text config's
`is_causal` (see `MoCaConfig`), and the hidden states are pooled into one vector per input.
"""

import json
import logging
import re
import shutil
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from transformers import AutoConfig, AutoModel, PreTrainedModel
from transformers.utils import ModelOutput, cached_file

from .configuration_moca import STOCK_PROCESSORS, MoCaConfig
from .processing_moca import RELEASE_IMAGE_TOKENS, InputError, MoCaProcessor, chat_template

logger = logging.getLogger(__name__)

# The weight dtypes every command accepts by name (`--dtype`).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REMOTE_CODE_FILES = ("configuration_moca.py", "modeling_moca.py", "processing_moca.py", "model_card.py")
# What a saved processor consists of, each part under one of its file names (transformers 5 writes the image
# processor into processor_config.json, earlier releases into preprocessor_config.json): without them a
# checkpoint has no processor, which is a warning, not an error.
PROCESSOR_FILES = {
    "image processor": ("processor_config.json", "preprocessor_config.json"),
    "tokenizer": ("tokenizer_config.json",),
}
# Weights are saved under the backbone's stock key names, those its own transformers class writes and its Hub
# checkpoints have: Qwen2-VL and Qwen2.5-VL (and the original MoCa release) keep the language model under `model.`
# and the vision tower under `visual.`; Qwen3-VL uses the module names (`model.language_model.`, `model.visual.`).
# Stock transformers, sentence-transformers and vLLM load them as the backbone.
_STOCK_KEYS = {
    "qwen2_vl": ((re.compile(r"^model\.language_model\."), "model."), (re.compile(r"^model\.visual\."), "visual.")),
    "qwen3_vl": (),
}
_STOCK_KEYS["qwen2_5_vl"] = _STOCK_KEYS["qwen2_vl"]
# ... and mapped back on loading, as are the `vlm.*` keys of checkpoints written by earlier versions of this package.
LOAD_KEY_MAPPING = {
    r"^vlm\.": "model.",
    r"^visual\.": "model.visual.",
    r"^model\.(?!language_model\.|visual\.)": "model.language_model.",
}
_LOAD_PATTERNS = [(re.compile(pattern), target) for pattern, target in LOAD_KEY_MAPPING.items()]


def module_key(name: str) -> str:
    """A stored weight name -> the name of the parameter of `MoCaModel` it holds (module names stay as they are)."""
    for pattern, target in _LOAD_PATTERNS:
        name = pattern.sub(target, name)
    return name


# The stock sentence-transformers modules every checkpoint lists (Transformer -> mean Pooling -> Normalize), so
# `SentenceTransformer(dir)` needs no remote code; vLLM reads its pooling and normalisation from the same files.
ST_TRANSFORMER = "sentence_transformers.base.modules.transformer.Transformer"
ST_POOLING = "sentence_transformers.sentence_transformer.modules.pooling.Pooling"
ST_NORMALIZE = "sentence_transformers.base.modules.normalize.Normalize"
# Keyword arguments of `from_pretrained` that also say where to find the processor files.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder")


@dataclass
class MoCaModelOutput(ModelOutput):
    """
    Args:
        embeddings (`torch.FloatTensor` of shape `(batch_size, hidden_size)`):
            Pooled (and, per config, L2-normalised) embeddings, in float32.
        last_hidden_state (`torch.FloatTensor` of shape `(batch_size, sequence_length, hidden_size)`):
            Final hidden states of the backbone's language model.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            Hidden states of every layer, when `output_hidden_states=True`.
    """

    embeddings: torch.FloatTensor | None = None
    last_hidden_state: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


class MoCaPreTrainedModel(PreTrainedModel):
    config: MoCaConfig
    config_class = MoCaConfig
    base_model_prefix = "moca"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _no_split_modules = [
        "Qwen2_5_VLDecoderLayer", "Qwen2_5_VLVisionBlock", "Qwen2VLDecoderLayer", "Qwen2VLVisionBlock",
        "Qwen3VLTextDecoderLayer", "Qwen3VLVisionBlock",
    ]  # fmt: skip


def mm_token_type_ids_from_input_ids(input_ids: torch.Tensor, config: MoCaConfig) -> torch.Tensor:
    """Text 0, image 1, video 2: what the backbone needs to build its 3D positions."""
    token_types = torch.zeros_like(input_ids, dtype=torch.int)
    token_types[input_ids == config.image_token_id] = 1
    token_types[input_ids == config.video_token_id] = 2
    return token_types


def pool(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Mean over non-padding tokens, or the last non-padding token (for left and right padding alike)."""
    hidden = last_hidden_state.float()
    mask = attention_mask.to(hidden.dtype)
    if mode == "mean":
        return (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    last = (positions * attention_mask.to(torch.long)).argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class MoCaModel(MoCaPreTrainedModel):
    """Bidirectional multimodal embedding model: backbone -> pooling -> normalisation."""

    def __init__(self, config: MoCaConfig, vlm: PreTrainedModel | None = None):
        super().__init__(config)
        self.model = vlm if vlm is not None else AutoModel.from_config(config.vlm_config)
        self.processor: MoCaProcessor | None = None
        self.post_init()

    def load_state_dict(self, state_dict, *args, **kwargs):
        """Also takes a saved checkpoint's tensors as they are stored (stock key names, or an earlier version's
        `vlm.*`): the Trainer reads `model.safetensors` itself when it resumes."""
        return super().load_state_dict({module_key(name): tensor for name, tensor in state_dict.items()}, *args, **kwargs)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def compute_position_ids(self, input_ids, attention_mask, image_grid_thw=None, video_grid_thw=None,
                             mm_token_type_ids=None) -> torch.Tensor:
        """3D M-RoPE positions, counted over non-padding tokens only (so left padding changes nothing)."""
        if mm_token_type_ids is None:
            mm_token_type_ids = mm_token_type_ids_from_input_ids(input_ids, self.config)
        position_ids, _ = self.model.get_rope_index(
            input_ids,
            mm_token_type_ids=mm_token_type_ids,
            image_grid_thw=image_grid_thw,
            video_grid_thw=video_grid_thw,
            attention_mask=attention_mask,
        )
        return position_ids

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        position_ids: torch.LongTensor | None = None,
        pixel_values_videos: torch.Tensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        output_hidden_states: bool | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> MoCaModelOutput:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = self.compute_position_ids(
                input_ids, attention_mask, image_grid_thw, video_grid_thw, mm_token_type_ids
            )
        outputs = self.model(
            input_ids=input_ids if inputs_embeds is None else None,
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw,
            mm_token_type_ids=mm_token_type_ids,
            use_cache=False,
            output_hidden_states=output_hidden_states,
            **kwargs,
        )
        embeddings = pool(outputs.last_hidden_state, attention_mask, self.config.pooling)
        if self.config.normalize:
            embeddings = F.normalize(embeddings, dim=-1)
        return MoCaModelOutput(
            embeddings=embeddings,
            last_hidden_state=outputs.last_hidden_state,
            hidden_states=outputs.hidden_states if output_hidden_states else None,
        )

    # ------------------------------------------------------------------ building and saving

    @classmethod
    def from_backbone(cls, name_or_path: str, processor: MoCaProcessor | None = None, dtype=None,
                      attn_implementation: str | None = None,
                      image_tokens: tuple[int, int] | None = RELEASE_IMAGE_TOKENS, **config_kwargs) -> "MoCaModel":
        """A fresh MoCa model from a causal VLM checkpoint (Hub name or folder), with its processor.

        `image_tokens` = (fewest, most) visual tokens per image, written into the processor (and so into every
        checkpoint saved from this model): the release's 256-1,024 by default; `None` keeps the backbone's.
        `config_kwargs` go to `MoCaConfig` (`pooling`, `normalize`, `bidirectional`, prompts, ...).
        """
        vlm_config = AutoConfig.from_pretrained(name_or_path)
        config = MoCaConfig(vlm_config=vlm_config, **config_kwargs)
        load_kwargs = {"config": config.vlm_config}
        if dtype is not None:
            load_kwargs["dtype"] = dtype
        if attn_implementation is not None:
            load_kwargs["attn_implementation"] = attn_implementation
        vlm, info = AutoModel.from_pretrained(name_or_path, output_loading_info=True, **load_kwargs)
        if info["missing_keys"]:
            raise ValueError(f"{name_or_path}: the backbone checkpoint lacks weights {sorted(info['missing_keys'])[:8]}")
        config.vlm_config = vlm.config
        model = cls(config, vlm=vlm)
        model.processor = processor if processor is not None else MoCaProcessor.from_pretrained(name_or_path)
        if image_tokens is not None:
            model.processor.set_image_token_bounds(*image_tokens)
        return model

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        hub_kwargs = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        kwargs.setdefault("key_mapping", LOAD_KEY_MAPPING)
        try:
            loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        except SafetensorError as error:  # safetensors' own message names no file
            path = _unreadable_weight_file(pretrained_model_name_or_path, hub_kwargs)
            raise ValueError(
                f"cannot read the weights {path}: {error} (a truncated or corrupt file: download or save it again)."
            ) from error
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # (model, loading info) with output_loading_info
        missing = [
            f"{part} ({' or '.join(names)})" for part, names in PROCESSOR_FILES.items()
            if not any(
                cached_file(pretrained_model_name_or_path, name, _raise_exceptions_for_missing_entries=False,
                            **hub_kwargs)
                for name in names
            )
        ]  # fmt: skip
        if missing:
            logger.warning(
                "%s has no processor (no %s): pass `processor=` to `encode`, or save one beside the weights.",
                pretrained_model_name_or_path, ", ".join(missing),
            )  # fmt: skip
            model.processor = None
        else:  # processor files that are there but broken raise: a silently missing processor would hide them
            model.processor = MoCaProcessor.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        return loaded

    def save_pretrained(self, save_directory, *args, state_dict=None, **kwargs):
        """The checkpoint in the backbone's stock layout (`MoCaConfig.to_stock_dict`, `_STOCK_KEYS`), with its
        processor, remote code, sentence-transformers files and model card. `state_dict` (what a sharded run
        gathers) replaces the module's own."""
        state_dict = self.state_dict() if state_dict is None else state_dict
        stock = {}
        for name, tensor in state_dict.items():
            for pattern, prefix in _STOCK_KEYS[self.config.vlm_config.model_type]:
                name = pattern.sub(prefix, name)
            stock[name] = tensor
        # The names are final: transformers must not revert the renaming it did on loading.
        super().save_pretrained(save_directory, *args, state_dict=stock, save_original_format=False, **kwargs)
        if not kwargs.get("is_main_process", True):
            return  # the main process writes the files beside the weights
        # Remote code: these files let `AutoModel.from_pretrained(dir, trust_remote_code=True)` and
        # `SentenceTransformer(dir, trust_remote_code=True)` work where this package is not installed.
        here = Path(__file__).parent
        for name in REMOTE_CODE_FILES:
            if (here / name).resolve() != (Path(save_directory) / name).resolve():
                shutil.copyfile(here / name, Path(save_directory) / name)
        if self.processor is not None:
            self.processor.chat_template = chat_template(self.config.image_prompt)
            self.processor.save_pretrained(save_directory)
            write_stock_processor_files(save_directory, self.config)
        write_sentence_transformers_files(save_directory, self.config)
        if not (Path(save_directory) / "README.md").exists():
            from .model_card import write_model_card

            write_model_card(self, save_directory)

    def push_to_hub(self, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                    token: bool | str | None = None, revision: str | None = None, create_pr: bool = False,
                    max_shard_size: int | str | None = "50GB", tags: list[str] | None = None, **card_kwargs):
        """Upload weights, remote code, processor, sentence-transformers files and the model card.

        The stock `push_to_hub` replaces the card `save_pretrained` writes with the repository's (or a blank
        template); here the card is written from this model, with `card_kwargs` (`base_model`, `datasets`,
        `training_args`, `eval_results`, ...) passed to `moca.model_card.write_model_card`.
        """
        import tempfile

        from huggingface_hub import HfApi

        from .model_card import write_model_card

        api = HfApi(token=token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        with tempfile.TemporaryDirectory() as tmp_dir:
            self.save_pretrained(tmp_dir, max_shard_size=max_shard_size)
            write_model_card(self, tmp_dir, model_id=repo_id, tags=tags, **card_kwargs)
            return api.upload_folder(
                repo_id=repo_id,
                folder_path=tmp_dir,
                commit_message=commit_message or "Upload MoCa model",
                revision=revision,
                create_pr=create_pr,
            )

    # ------------------------------------------------------------------ encoding what a person has

    @torch.inference_mode()
    def encode(
        self,
        inputs,
        batch_size: int = 32,
        prompt: str | None = None,
        prompt_name: str | None = None,
        truncate_dim: int | None = None,
        show_progress_bar: bool | None = None,
        processor: MoCaProcessor | None = None,
        max_length: int | None = None,
    ) -> torch.Tensor:
        """Embed texts, images and text+image inputs; returns a float32 CPU tensor `(len(inputs), dim)`.

        An input is a `str` (text; a path to an existing image file counts as an image), a `PIL.Image`, a
        `pathlib.Path` to an image, or a dict `{"text": ..., "image": ...}` whose image may be a list (for
        interleaved inputs, place them with `<image>` in the text). `prompt` is a format string with
        `{text}` (or a prefix); `prompt_name` picks one of `config.prompts` instead (the release's
        `image_question`, `caption`, `image`, `document_page`, `text`, and what training recorded). Inputs are sorted
        by their token counts (`MoCaProcessor.token_counts`) so that batches need little padding, and the next
        batch is prepared while the model runs; the result keeps the input order. `truncate_dim` (1 to the hidden
        size) keeps the first dimensions, renormalised.

        A bad input raises an `InputError` (a `ValueError`) naming its index in `inputs` (`MoCaProcessor.parse_inputs`
        and `MoCaProcessor` say which inputs are bad). A batch whose embeddings are not finite raises one naming
        the batch's first input: with finite inputs, only weights that hold NaN/inf give that.
        """
        processor = processor or self.processor
        if processor is None:
            raise ValueError("No processor: load the model with from_pretrained/from_backbone or pass `processor=`.")
        dim = self.config.hidden_size
        if truncate_dim is not None and (isinstance(truncate_dim, bool) or not isinstance(truncate_dim, int)
                                         or not 1 <= truncate_dim <= dim):  # fmt: skip
            raise ValueError(f"truncate_dim must be an integer in 1..{dim} (the embedding size), got {truncate_dim!r}.")
        items = processor.parse_inputs(inputs, self.resolve_prompt(prompt, prompt_name), image_prompt=self.config.image_prompt)
        if not items:
            return torch.empty(0, truncate_dim or dim)
        # Longest first by the tokens the processor will make (text and visual alike): neighbours in this order
        # pad each other little. A stable sort, so equal lengths keep their input order.
        lengths = processor.token_counts(items)
        order = sorted(range(len(items)), key=lambda i: -lengths[i])

        device = next(self.parameters()).device
        batches = [order[start : start + batch_size] for start in range(0, len(order), batch_size)]

        def prepare(batch_ids):
            return processor.batch([items[i] for i in batch_ids], max_length, indices=batch_ids)

        was_training = self.training
        self.eval()
        chunks = []
        # One thread decodes and preprocesses the next batch while the model runs this one (PIL, numpy, the
        # tokenizer and torch release the GIL); a bad input's error comes out of `result()` as it was raised.
        try:
            with ThreadPoolExecutor(max_workers=1) as prefetcher:
                upcoming = prefetcher.submit(prepare, batches[0])
                for number in _progress(range(len(batches)), show_progress_bar, len(batches) > 1):
                    batch = upcoming.result()
                    if number + 1 < len(batches):
                        upcoming = prefetcher.submit(prepare, batches[number + 1])
                    chunk = self(**batch.to(device)).embeddings.float().cpu()
                    if not chunk.isfinite().all():
                        raise InputError(batches[number][0], f"the embeddings of its batch ({len(batches[number])} "
                                                             f"inputs) are {NON_FINITE_EMBEDDINGS}")  # fmt: skip
                    chunks.append(chunk)
        finally:
            self.train(was_training)

        embeddings = torch.empty(len(items), dim)
        embeddings[torch.tensor(order)] = torch.cat(chunks)
        if truncate_dim is not None:
            embeddings = embeddings[:, :truncate_dim]
            if self.config.normalize:
                embeddings = F.normalize(embeddings, dim=-1)
        return embeddings

    def resolve_prompt(self, prompt: str | None = None, prompt_name: str | None = None) -> str | None:
        """The format string `encode` applies: `prompt` itself, or the named one of `config.prompts`."""
        if prompt_name is None:
            return prompt
        if prompt is not None:
            raise ValueError("Pass `prompt` or `prompt_name`, not both.")
        prompts = self.config.prompts or {}
        if prompt_name not in prompts:
            raise ValueError(f"No prompt named {prompt_name!r}: this checkpoint has {sorted(prompts)}.")
        return prompts[prompt_name]

    def encode_queries(self, inputs, prompt: str | None = None, prompt_name: str | None = None, **kwargs) -> torch.Tensor:
        """`encode` with the given prompt, else the config's `query_prompt` (none by default: raw queries)."""
        if prompt is None and prompt_name is None:
            prompt = self.config.query_prompt
        return self.encode(inputs, prompt=prompt, prompt_name=prompt_name, **kwargs)

    def encode_documents(self, inputs, prompt: str | None = None, prompt_name: str | None = None, **kwargs) -> torch.Tensor:
        """`encode` with the given prompt, else the config's `document_prompt` (none by default)."""
        if prompt is None and prompt_name is None:
            prompt = self.config.document_prompt
        return self.encode(inputs, prompt=prompt, prompt_name=prompt_name, **kwargs)


NON_FINITE_EMBEDDINGS = "not finite (NaN or inf): the checkpoint's weights may hold NaN/inf (check them with torch.isfinite)."


def _unreadable_weight_file(name_or_path, hub_kwargs: dict) -> str:
    """The first weight file of a checkpoint whose safetensors header does not read (the checkpoint itself when
    none is found, e.g. when the failure was past the header)."""
    index = cached_file(name_or_path, "model.safetensors.index.json", _raise_exceptions_for_missing_entries=False,
                        **hub_kwargs)  # fmt: skip
    if index is not None:
        with open(index, encoding="utf-8") as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
    else:
        names = ["model.safetensors"]
    for name in names:
        path = cached_file(name_or_path, name, _raise_exceptions_for_missing_entries=False, **hub_kwargs)
        if path is None:
            continue
        try:
            with safe_open(path, framework="pt"):
                pass
        except SafetensorError:
            return path
    return str(name_or_path)


def _progress(iterable: Iterable, show: bool | None, default: bool):
    if show is None:
        show = default
    if not show:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc="Encoding", unit="batch")


def _update_json(path: Path, update) -> None:
    with open(path, encoding="utf-8") as f:
        content = json.load(f)
    update(content)
    _write_json(path, content)


def _write_json(path: Path, content) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2)
        f.write("\n")


def write_stock_processor_files(save_directory, config: MoCaConfig) -> None:
    """The saved processor as the backbone's stock processor (`Qwen2_5_VLProcessor`, ...), which `AutoProcessor`
    loads without remote code (`MoCaModel.save_pretrained` gives it MoCa's input format as its chat template,
    `chat_template.jinja`). The `auto_map` stays: with
    `trust_remote_code=True`, `AutoProcessor` gives `MoCaProcessor`, which reads the same files (only their image
    processor and tokenizer, not the video processor, so it needs no torchvision)."""
    directory = Path(save_directory)
    stock_class = STOCK_PROCESSORS[config.vlm_config.model_type]

    def stock_processor(content):
        content["processor_class"] = stock_class
        image = content.get("image_processor", {})
        # The stock processors need a video processor; these are its defaults for the backbone's patching.
        content.setdefault("video_processor", {
            "video_processor_type": "Qwen3VLVideoProcessor" if config.vlm_config.model_type == "qwen3_vl" else "Qwen2VLVideoProcessor",
            **{key: image[key] for key in ("patch_size", "temporal_patch_size", "merge_size") if key in image},
        })  # fmt: skip

    def stock_tokenizer(content):
        content["processor_class"] = stock_class

    _update_json(directory / "processor_config.json", stock_processor)
    _update_json(directory / "tokenizer_config.json", stock_tokenizer)


def write_sentence_transformers_files(save_directory, config: MoCaConfig) -> None:
    """The sentence-transformers files of every MoCa checkpoint: stock modules (Transformer -> Pooling ->
    Normalize), so that `SentenceTransformer(dir)` loads it without remote code, and vLLM reads the pooling and the
    normalisation from them.

    Written by hand rather than by `SentenceTransformer.save` so that saving needs no sentence-transformers (nor
    torchvision, which its multimodal Transformer needs for Qwen-VL). Every input goes through the processor's chat
    template (the `message` modality), which applies the prompts as MoCa does; they are MoCa's format strings, by
    name (`prompt_name=`). `query` / `document`, which `encode_query` / `encode_document` use, are there only when
    the config sets a query / document prompt.
    """
    directory = Path(save_directory)
    modules = [{"idx": 0, "name": "0", "path": "", "type": ST_TRANSFORMER}]
    modules.append({"idx": 1, "name": "1", "path": "1_Pooling", "type": ST_POOLING})
    if config.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": ST_NORMALIZE})
    forward = {"method": "forward", "method_output_name": "last_hidden_state"}
    transformer = {
        "transformer_task": "feature-extraction",
        "modality_config": {"text": forward, "image": forward, "message": {**forward, "format": "structured"}},
        "module_output_name": "token_embeddings",
        # Qwen-VL's 3D positions need padded batches.
        "unpad_inputs": False,
    }
    pooling = {
        "embedding_dimension": config.hidden_size,
        "pooling_mode": "mean" if config.pooling == "mean" else "lasttoken",
        "include_prompt": True,
    }
    settings = {
        "model_type": "SentenceTransformer",
        "prompts": {
            **(config.prompts or {}),
            **{role: prompt for role, prompt in (("query", config.query_prompt), ("document", config.document_prompt))
               if prompt is not None},
        },
        "default_prompt_name": None,
        "similarity_fn_name": "cosine",
    }
    _write_json(directory / "modules.json", modules)
    _write_json(directory / "sentence_bert_config.json", transformer)
    (directory / "1_Pooling").mkdir(exist_ok=True)
    _write_json(directory / "1_Pooling" / "config.json", pooling)
    if config.normalize:  # a config file of its own, as sentence-transformers writes, so that uploads keep the folder
        (directory / "2_Normalize").mkdir(exist_ok=True)
        _write_json(directory / "2_Normalize" / "config.json",
                    {"module_input_name": "sentence_embedding", "module_output_name": "sentence_embedding"})
    _write_json(directory / "config_sentence_transformers.json", settings)


MoCaModel.register_for_auto_class("AutoModel")
AutoModel.register(MoCaConfig, MoCaModel, exist_ok=True)

__all__ = ["MoCaModel", "MoCaModelOutput", "MoCaPreTrainedModel", "pool"]

