"""The deployment files: compose.yaml, the Dockerfile, the Procfile, wired as the contract says."""

from __future__ import annotations

import fnmatch
import json
import shlex
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from sharechat.config import from_argv

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load((ROOT / "compose.yaml").read_text())
    return loaded


def environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment, whichever of compose's two spellings it uses."""
    raw = service.get("environment", {})
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {name: str(value) for name, value in raw.items()}


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuations joined and comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += stripped
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        keyword, _, arguments = pending.partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def test_three_services(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"postgres", "redis", "sharechat"}


def test_postgres_and_redis_images_and_healthchecks(compose: dict[str, Any]) -> None:
    postgres, redis = compose["services"]["postgres"], compose["services"]["redis"]
    assert postgres["image"].split(":")[0] == "postgres"
    assert postgres["image"].split(":")[1].startswith("16")
    assert redis["image"].split(":")[0] == "redis"
    assert redis["image"].split(":")[1].startswith("7")
    assert "pg_isready" in json.dumps(postgres["healthcheck"]["test"])
    assert "redis-cli" in json.dumps(redis["healthcheck"]["test"])
    assert "ping" in json.dumps(redis["healthcheck"]["test"])
    assert environment(postgres).get("POSTGRES_PASSWORD")


def test_database_url_points_at_the_postgres_service(compose: dict[str, Any]) -> None:
    postgres = environment(compose["services"]["postgres"])
    url = urlsplit(environment(compose["services"]["sharechat"])["DATABASE_URL"])
    assert url.scheme in ("postgresql", "postgres")
    assert url.hostname == "postgres"
    assert (url.port or 5432) == 5432
    # The official image: POSTGRES_USER defaults to postgres, POSTGRES_DB to the user.
    user = postgres.get("POSTGRES_USER", "postgres")
    assert url.username == user
    assert url.password == postgres["POSTGRES_PASSWORD"]
    assert url.path.lstrip("/") == postgres.get("POSTGRES_DB", user)


def test_redis_url_points_at_the_redis_service(compose: dict[str, Any]) -> None:
    url = urlsplit(environment(compose["services"]["sharechat"])["REDIS_URL"])
    assert url.scheme == "redis"
    assert url.hostname == "redis"
    assert (url.port or 6379) == 6379


def test_sharechat_is_built_here_and_published_on_8080(compose: dict[str, Any]) -> None:
    sharechat = compose["services"]["sharechat"]
    build = sharechat["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    assert (ROOT / context).resolve() == ROOT
    published = [str(port) for port in sharechat["ports"]]
    assert "8080:8080" in published
    assert environment(sharechat).get("PORT", "8080") == "8080"


def test_sharechat_waits_for_healthy_backends(compose: dict[str, Any]) -> None:
    depends_on = compose["services"]["sharechat"]["depends_on"]
    assert set(depends_on) == {"postgres", "redis"}
    for service in ("postgres", "redis"):
        assert depends_on[service]["condition"] == "service_healthy"


def test_compose_environment_is_a_valid_configuration(compose: dict[str, Any]) -> None:
    environ = environment(compose["services"]["sharechat"])
    config = from_argv([], environ)
    assert config.database_url == environ["DATABASE_URL"]
    assert config.redis_url == environ["REDIS_URL"]
    assert config.port == 8080
    assert config.host == "0.0.0.0"  # reachable from outside the container


def test_dockerfile_installs_the_package_and_serves() -> None:
    instructions = dockerfile()
    froms = [arguments for keyword, arguments in instructions if keyword == "FROM"]
    assert froms[0].startswith("python:3.11-slim")
    runs = " && ".join(arguments for keyword, arguments in instructions if keyword == "RUN")
    assert "pip install --no-deps ." in runs
    commands = [arguments for keyword, arguments in instructions if keyword == "CMD"]
    assert json.loads(commands[-1]) == ["sharechat", "serve"]
    assert "8080" in [arguments for keyword, arguments in instructions if keyword == "EXPOSE"]
    users = [arguments for keyword, arguments in instructions if keyword == "USER"]
    assert users, "the server must not run as root"
    assert users[-1].split(":")[0] not in ("root", "0")


def test_dockerfile_copies_what_the_build_needs() -> None:
    """Every COPY source exists and is not hidden from the build by .dockerignore."""
    ignored = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert ".git" in ignored

    def is_ignored(path: str) -> bool:
        return any(fnmatch.fnmatch(path, pattern.lstrip("/")) for pattern in ignored)

    for needed in ("setup.cfg", "pyproject.toml", "README.md", "sharechat", "sql"):
        assert (ROOT / needed).exists()
        assert not is_ignored(needed), needed
    for keyword, arguments in dockerfile():
        if keyword in ("COPY", "ADD"):
            *sources, _ = shlex.split(arguments)
            for source in sources:
                assert not source.startswith("--from"), "one stage: sources are the context"
                if source != ".":
                    assert (ROOT / source).exists(), source
                    assert not is_ignored(source.rstrip("/")), source


def test_dockerfile_installs_dependencies_before_the_code() -> None:
    """A change of the code rebuilds only the last layers: what comes before the first
    COPY of code (the dependencies) depends on setup.cfg and pyproject.toml alone."""
    instructions = dockerfile()
    dependencies_at = next(
        index
        for index, (keyword, arguments) in enumerate(instructions)
        if keyword == "RUN" and "pip install -r" in arguments
    )
    assert "setup.cfg" in instructions[dependencies_at][1]
    copied = [
        (index, source)
        for index, (keyword, arguments) in enumerate(instructions)
        if keyword == "COPY"
        for source in shlex.split(arguments)[:-1]
    ]
    before = {source for index, source in copied if index < dependencies_at}
    assert before == {"setup.cfg", "pyproject.toml"}
    assert {"sharechat", "sql"} <= {source for index, source in copied if index > dependencies_at}
    runs_after = [a for keyword, a in instructions[dependencies_at + 1 :] if keyword == "RUN"]
    assert ["pip install --no-deps ." in run for run in runs_after] == [True]


def test_dockerfile_image_stays_slim_and_non_root() -> None:
    instructions = dockerfile()
    assert [a for keyword, a in instructions if keyword == "FROM"] == ["python:3.11-slim"]
    environ = " ".join(a for keyword, a in instructions if keyword == "ENV")
    assert "PIP_NO_CACHE_DIR=1" in environ
    runs = " && ".join(a for keyword, a in instructions if keyword == "RUN")
    assert "useradd --system" in runs
    assert "rm -rf /src" in runs  # the sources do not stay in the image
    assert [a for keyword, a in instructions if keyword == "USER"] == ["sharechat"]


def procfile() -> dict[str, str]:
    lines = (ROOT / "Procfile").read_text().splitlines()
    pairs = (line.split(":", 1) for line in lines if line.strip())
    return {name.strip(): command.strip() for name, command in pairs}


def test_procfile_migrates_in_the_release_phase_and_serves() -> None:
    assert procfile() == {"release": "sharechat migrate", "web": "sharechat serve"}
    # The release phase runs before the new web processes start; serve migrates too
    # (a no-op then), so platforms without a release phase (Railway) still migrate.
    assert from_argv(shlex.split(procfile()["web"])[2:], {}).no_migrate is False
