"""Shared test fixtures. Only repo-relative paths: the tokenizer in assets/, images and data under tests/fixtures."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture(scope="session")
def tokenizer():
    """The real Qwen3/Ovis2.5 tokenizer; building the fast tokenizer from vocab+merges takes seconds: load once."""
    import data

    return data.load_tokenizer(str(ROOT / "assets" / "tiny"))
