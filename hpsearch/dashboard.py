"""The web dashboard: optuna-dashboard over hpsearch storage, each study file shown as its note."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request

import optuna
import optuna_dashboard

from hpsearch.storage import StorageError, artifact_dir, open_artifacts, open_readonly, resolve_url


def spec_note(name: str, description: str, spec_source: str) -> str:
    """The Markdown note for a study: its name, its description line and its study file."""
    # The fence must be longer than any backtick run inside the TOML, or the block would end early.
    longest = max((len(run) for run in re.findall(r"`+", spec_source)), default=0)
    fence = "`" * max(3, longest + 1)
    parts = [f"# {name}", description.strip(), f"{fence}toml\n{spec_source.rstrip()}\n{fence}"]
    return "\n\n".join(p for p in parts if p) + "\n"


def write_spec_note(study: optuna.Study, description: str, spec_source: str) -> None:
    """Show ``study``'s study file as its note in the dashboard (written when ``hpsearch run`` creates it)."""
    body = spec_note(study.study_name, description, spec_source)
    if optuna_dashboard.get_note(study) != body:
        optuna_dashboard.save_note(study, body)


def serve(url: str | None, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Serve the dashboard for the studies at ``url`` on ``host:port`` until interrupted.

    Blocks. The storage is opened read-only: the dashboard shows studies, it never changes them
    (a note or a deleted artifact made in the browser is refused). Report figures come from the
    artifact folder of ``url`` where ``hpsearch report`` made one.
    """
    storage = open_readonly(url)
    folder = artifact_dir(url)
    artifacts = open_artifacts(url) if folder.is_dir() else None
    optuna_dashboard.run_server(storage, host=host, port=port, artifact_store=artifacts)


def spawn(
    url: str | None, host: str = "127.0.0.1", port: int = 8080, timeout: float = 30.0
) -> subprocess.Popen[bytes]:
    """Start ``serve(url, host, port)`` in a child process and return once it answers HTTP.

    The caller owns the process: ``terminate()`` and ``wait()`` it when done. The child's output
    goes to this process's stdout/stderr. Raises ``RuntimeError`` (after stopping the child) if it
    exits early or does not answer ``GET /api/meta`` within ``timeout`` seconds.
    """
    cmd = [sys.executable, "-m", "hpsearch.dashboard", "--storage", resolve_url(url)]
    proc = subprocess.Popen([*cmd, "--host", host, "--port", str(port)])
    meta = f"http://{host}:{port}/api/meta"
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"dashboard exited with status {proc.returncode} before serving")
        try:
            with urllib.request.urlopen(meta, timeout=2) as resp:
                if resp.status == 200:
                    return proc
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            proc.terminate()
            proc.wait(10)
            raise RuntimeError(f"dashboard did not answer {meta} within {timeout:g} s")
        time.sleep(0.2)


def main(argv: list[str] | None = None) -> None:
    """``python -m hpsearch.dashboard [--storage URL] [--host H] [--port P]``."""
    parser = argparse.ArgumentParser(prog="python -m hpsearch.dashboard", description=__doc__)
    parser.add_argument("--storage", default=None, help="storage URL (default: $HPSEARCH_STORAGE)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args(argv)
    try:
        serve(args.storage, host=args.host, port=args.port)
    except StorageError as exc:
        sys.exit(f"error: {exc}")
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
