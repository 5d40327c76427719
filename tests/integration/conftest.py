"""Fixtures shared by the service tests: each module defines its own ``server``; ``client`` talks to it."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.integration.service_support import RunningServer


@pytest.fixture
def client(server: RunningServer) -> Iterator[httpx.Client]:
    with server.client() as http:
        yield http
