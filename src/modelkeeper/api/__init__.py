"""The REST API (FastAPI) over the orchestrator: ``create_app(settings)``."""

from modelkeeper.api.app import create_app

__all__ = ["create_app"]
