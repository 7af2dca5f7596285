"""The `kvwire` command line: `app` with every command registered."""

from channel.cli import bench, information, longcontext, nodes, profiles, research  # noqa: F401  (importing registers the commands)
from channel.cli.app import app

__all__ = ["app"]
