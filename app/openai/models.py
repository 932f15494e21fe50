"""OpenAI's `GET /v1/models`: the served models, each with its resolved checkpoint directory."""

from __future__ import annotations

import time

from app.core.registry import ModelRegistry
from app.openai.protocol import ModelCard, ModelList

STARTED = int(time.time())


async def list_models(registry: ModelRegistry) -> ModelList:
    cards = []
    for name in registry.names:
        info = await registry.info(name, timeout_s=registry.config.ready_timeout_s)
        cards.append(ModelCard(id=name, created=STARTED, root=info.root, task=info.task))
    return ModelList(data=cards)
