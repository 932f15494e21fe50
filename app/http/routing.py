"""What routes of every protocol share: the ingress's state, reached through FastAPI's dependencies.

The ingress's app factory (app/ingress.py) stores the registry on `app.state`; routes declare a
`Registry` parameter and never reach for module globals.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from app.core.registry import ModelRegistry


async def _registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


Registry = Annotated[ModelRegistry, Depends(_registry)]
