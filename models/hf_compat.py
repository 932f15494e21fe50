"""The private corners of transformers this code relies on, in one place.

Each has a unit test (tests/unit/test_hf_compat.py) that fails loudly when a release changes it;
pyproject.toml pins the transformers range those tests pass with.
"""

from __future__ import annotations

import torch

# transformers' loading marks the tensors it filled from a checkpoint with this attribute, and
# `PreTrainedModel.initialize_weights()` then leaves them alone (transformers/modeling_utils.py).
_INITIALIZED = "_is_hf_initialized"


def mark_loaded(tensor: torch.Tensor) -> None:
    """Tell `initialize_weights()` this tensor holds checkpoint data: it must not re-initialise it."""
    setattr(tensor, _INITIALIZED, True)
