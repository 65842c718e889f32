"""MoCaForContinualPretraining: head initialisation, the MAE decoder's inputs, losses, saving and loading."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForImageTextToText

from cpt_rows import make_rows
from moca.training.cpt import MoCaForContinualPretraining
from moca.training.cpt import CPTCollator
from moca.testing import make_tiny_tokenizer, tiny_image_processor, tiny_vlm_config


def model_inputs(batch: dict) -> dict:
    """The inputs of a plain MoCa model, out of a CPT batch."""
    keys = ("input_ids", "attention_mask", "pixel_values", "image_grid_thw", "mm_token_type_ids")
    return {key: batch[key] for key in keys}


@pytest.fixture(scope="module")
def cpt_model(tiny_vlm_dir):
    return MoCaForContinualPretraining.from_backbone(tiny_vlm_dir, image_tokens=None, dtype=torch.float32)


@pytest.fixture(scope="module")
def batch(cpt_model):
    rows = [dict(row, row_id=i) for i, row in enumerate(make_rows(6, seed=5))]
    return CPTCollator(cpt_model.processor, seed=0)(rows)


def test_heads_start_from_the_vlm(cpt_model):
    middle = cpt_model.text_model.layers[len(cpt_model.text_model.layers) // 2]
    for name, tensor in middle.state_dict().items():
        assert torch.equal(cpt_model.mae_decoder.state_dict()[name], tensor), name
    # The tiny VLM ties lm_head to the embeddings: the MLM head is the embedding matrix itself.
    assert cpt_model.mlm_head is None
    assert cpt_model.mlm_head_weight() is cpt_model.moca.get_input_embeddings().weight
    assert cpt_model.mae_head.out_features == 4 * 3 * 2 * 14 * 14


def test_untied_vlm_gives_an_mlm_head_copied_from_lm_head(tmp_path):
    tokenizer = make_tiny_tokenizer(seed=0)
    config = tiny_vlm_config("qwen2_5_vl", tokenizer)
    config.tie_word_embeddings = config.text_config.tie_word_embeddings = False
    torch.manual_seed(1)
    vlm = AutoModelForImageTextToText.from_config(config)
    vlm.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    tiny_image_processor("qwen2_5_vl").save_pretrained(tmp_path)

    model = MoCaForContinualPretraining.from_backbone(str(tmp_path), image_tokens=None, dtype=torch.float32)
    assert torch.equal(model.mlm_head.weight, vlm.lm_head.weight)
    assert not torch.equal(model.mlm_head.weight, model.moca.get_input_embeddings().weight)


def test_mae_decoder_gets_the_backbone_layers_inputs(cpt_model, batch):
    """At initialisation the MAE decoder is a copy of the middle layer: fed the middle layer's input, it must
    give that layer's output, which holds only if positions, mask and bidirectionality are the backbone's."""
    layers = cpt_model.text_model.layers
    middle = layers[len(layers) // 2]
    seen = {}

    def record(module, args, kwargs, output):
        seen["input"], seen["output"] = args[0], output

    handle = middle.register_forward_hook(record, with_kwargs=True)
    with torch.no_grad():
        position_ids = cpt_model.moca.compute_position_ids(
            batch["input_ids"], batch["attention_mask"], batch["image_grid_thw"], None, batch["mm_token_type_ids"]
        )
        cpt_model.moca(**model_inputs(batch))
        decoded = cpt_model.mae_decode(seen["input"], batch["attention_mask"], position_ids)
    handle.remove()
    assert batch["attention_mask"].eq(0).any()  # padding present: the mask matters
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(decoded[valid], seen["output"][valid], rtol=1e-5, atol=1e-5)


def test_mae_decoder_is_bidirectional_without_padding(cpt_model):
    """No padding: sdpa gets no mask, and only `is_causal=False` keeps it from being causal."""
    hidden = torch.randn(1, 12, cpt_model.config.hidden_size)
    position_ids = torch.arange(12).view(1, 1, -1).expand(3, 1, -1)
    attention_mask = torch.ones(1, 12, dtype=torch.long)
    with torch.no_grad():
        before = cpt_model.mae_decode(hidden, attention_mask, position_ids)
        changed = hidden.clone()
        changed[0, -1] += 1.0
        after = cpt_model.mae_decode(changed, attention_mask, position_ids)
    assert (before[0, 0] - after[0, 0]).abs().max() > 1e-4


def test_losses_use_masked_positions_only(cpt_model, batch):
    with torch.no_grad():
        output = cpt_model(**batch)
        assert torch.isfinite(output.mlm_loss) and torch.isfinite(output.mae_loss)
        assert cpt_model.mae_loss_weight == 0.1  # the release's weight is the default (the paper's: 0.5)
        torch.testing.assert_close(output.loss, output.mlm_loss + 0.1 * output.mae_loss)

        unmasked_patches = ~batch["image_token_mask"].repeat_interleave(4)
        targets = batch["pixel_targets"].clone()
        targets[unmasked_patches] += 5.0
        assert torch.equal(cpt_model(**{**batch, "pixel_targets": targets}).mae_loss, output.mae_loss)
        targets[~unmasked_patches] += 5.0
        assert cpt_model(**{**batch, "pixel_targets": targets}).mae_loss > output.mae_loss + 1

        text_only = {k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids", "labels")}
        keep = batch["mm_token_type_ids"].eq(0).all(dim=1)
        text_only = {k: v[keep] for k, v in text_only.items()}
        output = cpt_model(**text_only)
        assert output.mae_loss is None and torch.equal(output.loss, output.mlm_loss)


def test_save_gives_a_plain_moca_checkpoint_and_resumable_heads(cpt_model, batch, tmp_path):
    with torch.no_grad():
        cpt_model.mae_head.bias.add_(0.5)  # differs from a fresh initialisation
    cpt_model.save_pretrained(tmp_path)
    embedder = AutoModel.from_pretrained(tmp_path, trust_remote_code=True, dtype=torch.float32)
    assert type(embedder).__name__ == "MoCaModel"
    assert not any(key.startswith(("mae_", "mlm_")) for key in load_file(tmp_path / "model.safetensors"))
    with torch.no_grad():
        expected = cpt_model.moca(**model_inputs(batch))
        embeddings = embedder(**model_inputs(batch))
    torch.testing.assert_close(embeddings.embeddings, expected.embeddings, rtol=0, atol=0)

    reloaded = MoCaForContinualPretraining.from_pretrained(tmp_path, dtype=torch.float32)
    for name, tensor in cpt_model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], tensor), name


def test_mask_token_gets_an_embedding_row(tiny_vlm_dir):
    model = MoCaForContinualPretraining.from_backbone(tiny_vlm_dir, image_tokens=None, dtype=torch.float32)
    mask_id = model.processor.mask_token_id
    model.moca.resize_token_embeddings(mask_id)  # a backbone whose embeddings end before <|mask|>
    processor = model.add_mask_token()
    assert model.moca.get_input_embeddings().num_embeddings == len(processor.tokenizer) > mask_id
    with torch.no_grad():
        output = model(input_ids=torch.tensor([[5, mask_id, 7]]), labels=torch.tensor([[-100, 6, -100]]))
    assert torch.isfinite(output.loss)


def test_adding_the_mask_token_resizes_the_backbone_and_survives_a_reload(tmp_path):
    """The Qwen tokenizers lack `<|mask|>`: CPT adds an embedding row. The resize must reach the backbone's text
    config (what `MoCaConfig.get_text_config()` returns), or the saved checkpoint would not load."""
    from moca import MoCaModel

    tokenizer = make_tiny_tokenizer(seed=0)
    config = tiny_vlm_config("qwen2_5_vl", tokenizer)
    mask_id = tokenizer.convert_tokens_to_ids("<|mask|>")
    config.text_config.vocab_size = mask_id  # the embedding has no row for the mask token yet
    torch.manual_seed(2)
    AutoModelForImageTextToText.from_config(config).save_pretrained(tmp_path / "vlm")
    tokenizer.save_pretrained(tmp_path / "vlm")
    tiny_image_processor("qwen2_5_vl").save_pretrained(tmp_path / "vlm")

    model = MoCaForContinualPretraining.from_backbone(str(tmp_path / "vlm"), image_tokens=None, dtype=torch.float32)
    assert model.moca.config.get_text_config() is model.moca.config.vlm_config.text_config
    assert model.moca.get_input_embeddings().num_embeddings == mask_id
    model.add_mask_token()
    rows = model.moca.get_input_embeddings().num_embeddings
    assert rows > mask_id and model.moca.config.vlm_config.text_config.vocab_size == rows
    model.save_pretrained(tmp_path / "cpt")
    reloaded = MoCaModel.from_pretrained(tmp_path / "cpt", dtype=torch.float32)
    torch.testing.assert_close(reloaded.get_input_embeddings().weight, model.moca.get_input_embeddings().weight)
