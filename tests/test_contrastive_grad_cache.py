import contextlib

import pytest
import torch
from torch import nn

from moca.training.contrastive import contrastive_loss, grad_cache_loss


class TinyEncoder(nn.Module):
    """Stand-in for MoCaModel: token embeddings -> dropout -> linear -> mean over non-padding tokens."""

    def __init__(self, vocab=50, hidden=16, dropout=0.0):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, input_ids, attention_mask):
        hidden = self.proj(self.dropout(self.embed(input_ids)))
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1)


def make_batch(rows, generator):
    lengths = torch.randint(2, 7, (rows,), generator=generator)
    input_ids = torch.randint(1, 50, (rows, 7), generator=generator)
    attention_mask = (torch.arange(7) < lengths[:, None]).long()
    return {"input_ids": input_ids * attention_mask, "attention_mask": attention_mask}


def chunked(batch, size):
    rows = batch["input_ids"].shape[0]
    return [{k: v[i : i + size] for k, v in batch.items()} for i in range(0, rows, size)]


def grads(model):
    return {name: p.grad.clone() for name, p in model.named_parameters()}


# fp32 throughout; the two computations differ only in summation order.
ATOL, RTOL = 1e-5, 1e-4


# Rows with 0 to 3 hard negatives (20 in all), as a batch where some rows have short lists.
UNEVEN_NEGATIVES = [2, 2, 1, 0, 3, 2, 2, 2, 3, 3]


@pytest.mark.parametrize("negatives", ["own", "batch"])
def test_grad_cache_equals_full_batch_loss_and_gradients(negatives):
    torch.manual_seed(0)
    model = TinyEncoder()
    generator = torch.Generator().manual_seed(1)
    queries, documents = make_batch(10, generator), make_batch(30, generator)

    def loss_fn(q, d):
        return contrastive_loss(q, d, temperature=0.05, negatives_per_query=UNEVEN_NEGATIVES, negatives=negatives)

    reference = loss_fn(model(**queries), model(**documents))
    reference.backward()
    expected = grads(model)
    model.zero_grad()

    chunks = chunked(queries, 3) + chunked(documents, 4)
    loss = grad_cache_loss(lambda chunk: model(**chunk), chunks, lambda e: loss_fn(e[:10], e[10:]))
    assert all(p.grad is None for p in model.parameters())  # the parameter gradients come in the caller's backward
    loss.backward()
    torch.testing.assert_close(loss, reference.detach(), atol=ATOL, rtol=RTOL)
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, expected[name], atol=ATOL, rtol=RTOL, msg=name)


def test_grad_cache_replays_dropout_and_syncs_only_on_the_last_chunk():
    model = TinyEncoder(dropout=0.3).train()
    generator = torch.Generator().manual_seed(2)
    queries, documents = make_batch(6, generator), make_batch(12, generator)
    query_chunks, document_chunks = chunked(queries, 2), chunked(documents, 4)

    def loss_fn(q, d):
        return contrastive_loss(q, d, temperature=0.05, matryoshka_dims=[16, 8])

    # The plain computation that draws the same dropout masks: the chunks encoded in order, all in one graph.
    torch.manual_seed(3)
    embeddings = [model(**chunk) for chunk in [*query_chunks, *document_chunks]]
    reference = loss_fn(torch.cat(embeddings[:3]), torch.cat(embeddings[3:]))
    reference.backward()
    expected = grads(model)
    model.zero_grad()

    unsynced = []

    @contextlib.contextmanager
    def no_sync():
        unsynced.append(True)
        yield

    torch.manual_seed(3)
    loss = grad_cache_loss(
        lambda chunk: model(**chunk), query_chunks + document_chunks, lambda e: loss_fn(e[:6], e[6:]), no_sync=no_sync
    )
    loss.backward()
    torch.testing.assert_close(loss, reference.detach(), atol=ATOL, rtol=RTOL)
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, expected[name], atol=ATOL, rtol=RTOL, msg=name)
    assert len(unsynced) == len(query_chunks) + len(document_chunks) - 1


def test_grad_cache_scales_with_the_gradient_the_caller_backpropagates():
    """The Trainer back-propagates `loss / gradient_accumulation_steps` (and a mixed-precision loss scale): the
    parameter gradients must carry that factor, as they do for the plain loss."""
    torch.manual_seed(0)
    model = TinyEncoder()
    generator = torch.Generator().manual_seed(4)
    queries, documents = make_batch(4, generator), make_batch(8, generator)

    def loss_fn(q, d):
        return contrastive_loss(q, d, temperature=0.05)

    (loss_fn(model(**queries), model(**documents)) / 4).backward()
    expected = grads(model)
    model.zero_grad()
    loss = grad_cache_loss(lambda chunk: model(**chunk), chunked(queries, 3) + chunked(documents, 3),
                           lambda e: loss_fn(e[:4], e[4:]))  # fmt: skip
    (loss / 4).backward()
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, expected[name], atol=ATOL, rtol=RTOL, msg=name)
