"""The one module that builds an app at import time: gunicorn's `aisandbox.http.asgi:app`.

Settings come from the AISANDBOX_* environment that `aisandbox serve` sets before it starts gunicorn; the
engine is constructed here (cheaply) and loads in the ASGI lifespan, in each worker, after the fork.
"""

from __future__ import annotations

import logging

from aisandbox.http.app import create_app
from aisandbox.runtime.loader import create_engine
from aisandbox.settings import ServerSettings

settings = ServerSettings()
logging.basicConfig(
    level=settings.log_level.upper(), format="%(asctime)s %(levelname)s [%(process)d] %(name)s: %(message)s"
)
app = create_app(settings, create_engine(settings))
