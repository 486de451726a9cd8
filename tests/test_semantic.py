"""The anchor loss is the official MSE over input embeddings, computed without a forked encoder."""

import torch

from compinv.models import build_tiny_pipeline
from compinv.semantic import anchor_loss, captured_input_embeddings, input_embeddings
from compinv.tokens import add_concept_token, single_token_id
from helpers import moved_concept


def test_anchor_loss_equals_closed_form_l2_pull():
    enc, table, cat, concept, ids, anchor_ids = moved_concept()

    with captured_input_embeddings(enc) as captured:
        enc(ids)
    with torch.no_grad():
        target = input_embeddings(enc, anchor_ids)
    loss = anchor_loss(captured[0], target)

    # Independent: only placeholder rows differ; each occurrence adds ||row - cat||^2.
    per_occurrence = ((table[list(concept.ids)] - table[cat]) ** 2).sum(dim=1).detach()
    expected = 2 * per_occurrence.sum() / (2 * 77 * table.shape[1])
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-9)


def test_anchor_loss_gradient_reaches_only_concept_rows():
    pipe = build_tiny_pipeline()
    tok, enc = pipe.tokenizer, pipe.text_encoder
    cat = single_token_id(tok, "cat", "--anchor-word")
    concept = add_concept_token(tok, enc, "<x>", 1, single_token_id(tok, "dog", "--init-word"))
    ids = tok([f"a {concept.text}"], padding="max_length", max_length=77, return_tensors="pt").input_ids
    anchor_ids = torch.where(ids == concept.ids[0], cat, ids)
    table = enc.get_input_embeddings().weight
    table.requires_grad_(True)
    with captured_input_embeddings(enc) as captured:
        enc(ids)
    anchor_loss(captured[0], input_embeddings(enc, anchor_ids)).backward()
    rows_with_grad = table.grad.abs().sum(dim=1).nonzero().flatten().tolist()
    assert rows_with_grad == [concept.ids[0]]
