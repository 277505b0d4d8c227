"""Shared test setup.

TRITON_INTERPRET must be set before any module defines a @triton.jit kernel, so it is set here, at
the top of the root conftest, which pytest imports before any test module.
"""

import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
# Caches the engine keeps in the user's cache folder (converted tokenizers, quantized weights of the
# embedded model) go to a folder of this test run, never into the home of whoever runs the tests.
os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="kimi-desk-test-cache-")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """The spec's 4-layer tiny config (K K K M), random weights, float32, one safetensors file."""
    from kimi_desk.bench.random_checkpoint import tiny_config, write_random_checkpoint

    return write_random_checkpoint(tiny_config(), tmp_path_factory.mktemp("tiny") / "model", seed=1)


@pytest.fixture(scope="session")
def tail7_checkpoint(tmp_path_factory):
    """7 layers, K K K M K K M, sharded: the real model's irregular tail and the index.json layout."""
    from kimi_desk.bench.random_checkpoint import tail7_config, write_random_checkpoint

    return write_random_checkpoint(
        tail7_config(), tmp_path_factory.mktemp("tail7") / "model", seed=2, max_shard_bytes=400_000
    )


@pytest.fixture(scope="session")
def chat_checkpoint(tmp_path_factory):
    """The tiny config with a vocabulary for a real (small) tokenizer: tokenizer.json in the folder, the
    Kimi special tokens after 700 base tokens (<|im_end|> = 702, the config's eos)."""
    from kimi_desk.bench.random_checkpoint import tiny_config, write_random_checkpoint, write_small_tokenizer

    config = tiny_config(vocab_size=1024, bos_token_id=700, eos_token_id=702, pad_token_id=957)
    path = write_random_checkpoint(config, tmp_path_factory.mktemp("chat") / "model", seed=5)
    write_small_tokenizer(path)
    return path
