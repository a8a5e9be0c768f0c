"""Fixtures for real-path tests: SoftHSM2 tokens and servers, started and stopped by PID."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.servers import Server, start_server
from tests.support.softhsm import Token, make_token


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def _real_components() -> None:
    missing = [tool for tool in ("softhsm2-util", "pkcs11-tool") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"missing {missing}: run `make test`, which installs them")


@pytest.fixture
def token(tmp_path: Path) -> Token:
    return make_token(tmp_path / "softhsm")


@pytest.fixture
def p11guard_tcp(token: Token, tmp_path: Path) -> Iterator[Server]:
    server = start_server("p11guard", token, tmp_path / "p11guard")
    yield server
    server.stop()


@pytest.fixture
def p11guard_unix(token: Token, tmp_path: Path) -> Iterator[Server]:
    server = start_server("p11guard", token, tmp_path / "p11guard-unix", unix=True)
    yield server
    server.stop()
