"""docker/: the compose file is one docker-compose accepts and wires the fleet the README describes,
and the image is set up with the README quickstart's own commands.

The compose file is read back through Debian's ``docker-compose config`` (no Docker engine needed),
so the facts checked here are those of the file as Compose resolves it: anchors merged, ``${STUDY}``
filled in, short forms expanded. The tests fail, never skip, when ``docker-compose`` is missing.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from hpsearch.cli import main

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker" / "compose.yaml"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
README = (ROOT / "README.md").read_text(encoding="utf-8")
SERVICES = {"db", "dashboard", "proxy", "worker"}


def compose(*args: str, study: str | None = None) -> str:
    """``docker-compose -f docker/compose.yaml ARGS``'s output; a failure fails the test with its message."""
    exe = shutil.which("docker-compose")
    if exe is None:
        pytest.fail(
            "docker-compose is not installed: `apt-get install -y docker-compose` (Debian's, as the "
            "README's test command installs it)",
            pytrace=False,
        )
    env = {k: v for k, v in os.environ.items() if k != "STUDY"}
    if study is not None:
        env["STUDY"] = study
    done = subprocess.run(
        [exe, "-f", str(COMPOSE), *args], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, f"docker-compose {' '.join(args)} refused the file:\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def config() -> dict[str, Any]:
    """The compose file as ``docker-compose config`` resolves it, with STUDY unset."""
    resolved = yaml.safe_load(compose("config"))
    assert isinstance(resolved, dict)
    return resolved


def service(config: dict[str, Any], name: str) -> dict[str, Any]:
    services = config["services"]
    assert name in services, f"no service {name!r} in {COMPOSE}"
    found: dict[str, Any] = services[name]
    return found


def env(svc: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping (Compose allows a list of KEY=VALUE too)."""
    value = svc.get("environment") or {}
    if isinstance(value, list):
        value = dict(item.partition("=")[::2] for item in value)
    return {k: str(v) for k, v in value.items()}


def mounts(svc: dict[str, Any]) -> dict[str, str]:
    """A service's volumes as {path in the container: source}, short or long syntax."""
    found = {}
    for volume in svc.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
        else:
            source, target = volume["source"], volume["target"]
        found[target] = source
    return found


def published(svc: dict[str, Any]) -> set[int]:
    ports = set()
    for port in svc.get("ports", []):
        if isinstance(port, dict):
            ports.add(int(port["published"]))
        else:
            ports.add(int(str(port).split(":")[-2]))
    return ports


def healthy_dependency(svc: dict[str, Any], on: str) -> bool:
    depends = svc.get("depends_on") or {}
    return isinstance(depends, dict) and depends.get(on, {}).get("condition") == "service_healthy"


def option(command: list[str], name: str) -> str | None:
    return command[command.index(name) + 1] if name in command else None


def test_docker_compose_accepts_the_file_and_finds_the_four_services() -> None:
    assert set(compose("config", "--services").split()) == SERVICES
    assert set(compose("config", "--volumes").split()) >= {"db", "results"}
    # Obsolete in Compose v2 (`version`), refused by docker-compose 1.29 (`name`).
    raw = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert "version" not in raw and "name" not in raw


def test_the_database_keeps_its_data_in_a_named_volume_and_reports_its_health(
    config: dict[str, Any],
) -> None:
    db = service(config, "db")
    assert db["image"].startswith("postgres:")
    assert "pg_isready" in " ".join(db.get("healthcheck", {}).get("test", [])), (
        "db has no pg_isready health check"
    )
    data = mounts(db)["/var/lib/postgresql/data"]
    assert data in config["volumes"], f"{data!r} is a host path, not a named volume"


def test_the_dashboard_and_the_proxy_open_the_database_once_it_is_healthy(config: dict[str, Any]) -> None:
    db = env(service(config, "db"))
    url = f"postgresql+psycopg://{db['POSTGRES_USER']}:{db['POSTGRES_PASSWORD']}@db:5432/{db['POSTGRES_DB']}"
    dashboard, proxy = service(config, "dashboard"), service(config, "proxy")
    assert dashboard["command"] == ["dashboard", "--host", "0.0.0.0", "--port", "8080"]
    assert env(dashboard)["HPSEARCH_STORAGE"] == url
    assert published(dashboard) == {8080}
    assert proxy["command"][0] == "storage-proxy"
    assert option(proxy["command"], "--host") == "0.0.0.0"
    # --storage on the command line, or HPSEARCH_STORAGE (kept out of the process list).
    assert (option(proxy["command"], "--storage") or env(proxy)["HPSEARCH_STORAGE"]) == url
    assert published(proxy) == {int(option(proxy["command"], "--port") or 0)}
    assert healthy_dependency(dashboard, "db") and healthy_dependency(proxy, "db")


def test_workers_scale_share_one_folder_reach_the_database_through_the_proxy_and_get_gpus(
    config: dict[str, Any],
) -> None:
    worker, proxy = service(config, "worker"), service(config, "proxy")
    port = option(proxy["command"], "--port")
    assert env(worker)["HPSEARCH_STORAGE"] == f"grpc://proxy:{port}"
    assert "proxy" in worker["depends_on"]
    assert worker["command"] == ["run", "--study", "quickstart"]
    # --scale worker=N: N containers cannot share one name or one host port.
    assert "container_name" not in worker and "ports" not in worker
    # A finished study ends the worker for good; a crashed one comes back and resumes.
    assert worker["restart"].startswith("on-failure")
    (gpu,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert gpu["driver"] == "nvidia" and gpu["capabilities"] == ["gpu"]
    assert gpu["count"] == "all" or int(gpu["count"]) >= 1
    # Every worker mounts one named volume over the image's artifacts folder (checkpoints), so a
    # trial that loses its worker resumes from its checkpoint in another.
    (artifacts,) = re.findall(r"HPSEARCH_ARTIFACTS=(\S+)", DOCKERFILE.read_text(encoding="utf-8"))
    over = [(t, v) for t, v in mounts(worker).items() if Path(artifacts).is_relative_to(t)]
    assert over, f"no volume of the worker holds HPSEARCH_ARTIFACTS={artifacts}"
    for target, volume in over:
        assert volume in config["volumes"], f"{target} is on {volume!r}, not a named volume"


def test_the_study_comes_from_the_environment() -> None:
    resolved = yaml.safe_load(compose("config", study="alexnet-fashion"))
    assert resolved["services"]["worker"]["command"] == ["run", "--study", "alexnet-fashion"]


def test_every_hpsearch_service_runs_the_image_and_a_command_the_cli_takes(config: dict[str, Any]) -> None:
    for name in SERVICES - {"db"}:
        svc = service(config, name)
        assert Path(svc["build"]["context"]) == ROOT, name
        assert (Path(svc["build"]["context"]) / svc["build"]["dockerfile"]) == DOCKERFILE, name
        command, *args = svc["command"]
        assert command in main.commands, f"{name}: `hpsearch {command}` is not a command"
        try:
            main.commands[command].make_context(command, list(args))
        except click.UsageError as exc:
            raise AssertionError(f"{name}: hpsearch {' '.join(svc['command'])}: {exc}") from None


def shell_commands(script: str) -> list[list[str]]:
    """Each ``&&``-separated command of a shell script, as words, continuation lines joined."""
    script = script.replace("\\\n", " ")
    return [shlex.split(part) for line in script.splitlines() for part in line.split("&&") if part.strip()]


def quickstart() -> list[list[str]]:
    block = re.search(r"<!-- quickstart-command -->\n```bash\n(.*?)^```$", README, re.S | re.M)
    assert block, "README.md has no quickstart-command block"
    return shell_commands(block.group(1))


def dockerfile_runs() -> list[list[str]]:
    text = re.sub(r"^\s*#.*\n", "", DOCKERFILE.read_text(encoding="utf-8"), flags=re.M)
    runs = re.findall(r"^RUN\s+(.*?)(?<!\\)$", text, re.S | re.M)
    return [words for run in runs for words in shell_commands(run)]


def test_the_image_installs_the_data_and_the_package_with_the_quickstart_commands() -> None:
    readme, docker = quickstart(), dockerfile_runs()
    apt = [c for c in readme if c[:1] == ["apt-get"]]
    assert apt and all(c in docker for c in apt), f"{apt} not in the Dockerfile's RUN steps {docker}"
    setup = [c for c in readme if c[0] in ("python3", ".venv/bin/pip")]
    *plain, install = setup
    assert all(c in docker for c in plain), f"{plain} not in the Dockerfile's RUN steps {docker}"
    # The image installs the project with extras; otherwise it is the quickstart's install line.
    (extended,) = [c for c in docker if c[:-1] == install[:-1] and c[-1].startswith(install[-1] + "[")]
    extras = set(re.fullmatch(r".*\[(.*)\]", extended[-1]).group(1).split(","))  # type: ignore[union-attr]
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    known = set(pyproject["project"]["optional-dependencies"])
    assert {"postgres", "grpc"} <= extras <= known, f"extras {extras}; pyproject.toml has {known}"


def test_the_readme_test_command_installs_docker_compose() -> None:
    block = re.search(r"<!-- test-command -->\n```bash\n(.*?)^```$", README, re.S | re.M)
    assert block, "README.md has no test-command block"
    (apt,) = [c for c in shell_commands(block.group(1)) if c[:2] == ["apt-get", "install"]]
    assert "docker-compose" in apt
