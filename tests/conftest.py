"""Shared pytest fixtures.

Tokenizers: checkpoint-form tokenizer folders rebuilt once per session from tests/data/tokenizers/ (see
tests/tokenizer_files.py), and the tokenizers loaded from them (loading the Qwen tokenizer.json takes ~1 s).
"""

from __future__ import annotations

import pytest
import tokenizer_files

from minisail.text.tokenizer import load_tokenizer


@pytest.fixture(scope="session")
def qwen25_tokenizer_dir(tmp_path_factory):
    return tokenizer_files.qwen25_tokenizer_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def sailvl2_tokenizer_dir(tmp_path_factory):
    return tokenizer_files.sailvl2_tokenizer_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def internlm2_tokenizer_dir(tmp_path_factory):
    return tokenizer_files.internlm2_tokenizer_dir(tmp_path_factory)


@pytest.fixture(scope="session")
def qwen25_tokenizer(qwen25_tokenizer_dir):
    return load_tokenizer(qwen25_tokenizer_dir)


@pytest.fixture(scope="session")
def sailvl2_tokenizer(sailvl2_tokenizer_dir):
    return load_tokenizer(sailvl2_tokenizer_dir)


@pytest.fixture(scope="session")
def internlm2_tokenizer(internlm2_tokenizer_dir):
    return load_tokenizer(internlm2_tokenizer_dir)
