"""The `kvwire` command line: `app` with every command registered."""

from common.cli import bench, nodes, research  # noqa: F401  (importing registers the commands)
from common.cli.app import app

__all__ = ["app"]
