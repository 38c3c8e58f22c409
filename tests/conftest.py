"""Fixtures shared by test modules: the tiny model folder and echo prompt file that the validate tests check."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import echo_rows, make_tiny_model, write_jsonl


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("m") / "hf")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("d") / "echo.jsonl", echo_rows(40))
