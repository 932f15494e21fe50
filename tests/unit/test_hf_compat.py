"""transformers' private behaviour models/hf_compat.py relies on: if a release changes it, these
fail here, loudly, instead of a pipeline stage silently holding random weights."""

from __future__ import annotations

import torch
from transformers import BertConfig, BertModel

from models.hf_compat import mark_loaded


def test_initialize_weights_leaves_marked_tensors_alone_and_fills_the_others():
    """What models/stages.materialise does: a model built on the meta device, given checkpoint
    tensors (marked), then initialised: only the unmarked tensors get initial values."""
    config = BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)  # fmt: skip
    checkpoint = BertModel(config).state_dict()
    with torch.device("meta"):
        model = BertModel(config)
    state = {k: torch.full_like(v, 7.0) if v.is_floating_point() else v for k, v in checkpoint.items()}
    model.load_state_dict(state, strict=False, assign=True)
    filled = model.pooler.dense.weight
    for tensor in [*model.parameters(), *model.buffers()]:
        if tensor is not filled:
            mark_loaded(tensor)
    model.initialize_weights()
    assert torch.all(model.embeddings.word_embeddings.weight == 7.0), "a marked (checkpoint) tensor was re-initialised"
    assert not torch.all(filled == 7.0), "an unmarked tensor was not initialised"
