"""Shared fixtures."""

import pytest

from workflow_driver import SnakemakeServer, Workflow


@pytest.fixture
def wf(tmp_path):
    """A Snakemake working directory in ``tmp_path`` (see :class:`workflow_driver.Workflow`)."""
    return Workflow(tmp_path)


@pytest.fixture(scope="session")
def snakemake_server(tmp_path_factory):
    """One process that forks a Snakemake run per request (for the many short dry-runs)."""
    server = SnakemakeServer(tmp_path_factory.mktemp("snakemake_server"))
    yield server
    server.close()
