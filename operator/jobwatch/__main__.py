"""`python -m jobwatch`: run the operator. Configuration: environment variables (config.py)."""

from __future__ import annotations

import logging
import os
import sys

import kopf
import uvloop

from . import handlers
from .config import Config, ConfigError


def main() -> None:
    logging.basicConfig(
        level=os.environ.get("JOBWATCH_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # kopf logs every event handler call at INFO: at thousands of watches that
    # is mostly our own status echoes.
    logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    try:
        config = Config.from_env()
    except ConfigError as exc:
        print(f"jobwatch: bad configuration: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    handlers.configure(config)
    kopf.run(
        loop=uvloop.new_event_loop(),
        stop_flag=handlers.service.stop,
        standalone=True,
        clusterwide=not config.namespaces,
        namespaces=config.namespaces,
        liveness_endpoint=f"http://0.0.0.0:{config.health_port}/healthz",
    )


if __name__ == "__main__":
    main()
