"""``python -m hpsearch`` and the ``hpsearch`` script: the CLI, with Ctrl-C handled from the first line."""

from __future__ import annotations

import sys


def entry() -> None:
    """Run the CLI. Importing torch takes seconds; a Ctrl-C meanwhile is a clean exit, not a traceback."""
    try:
        from hpsearch.cli import main
    except KeyboardInterrupt:
        sys.stderr.write("interrupted while starting; nothing was run\n")
        sys.exit(130)
    main(prog_name="hpsearch")


if __name__ == "__main__":
    entry()
