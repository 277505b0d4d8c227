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

import inspect  # noqa: E402

import pytest  # noqa: E402


def _nested_jit_calls_skip_patching_again():
    """Triton's interpreter patches triton.language again at every call of a jitted function inside a
    kernel (tl.sum, tl.sigmoid, the kernels' helpers), in every program it runs: a few milliseconds
    each, about a third of the Triton tests' time. Such a call only finds patched what the kernel's
    launch (or an earlier call) already patched, so it is skipped where every module the function sees
    is patched: the same interpreter, the same results. Where Triton's internals differ, nothing changes."""
    try:
        import triton.language as tl
        from triton.runtime import interpreter
    except ImportError:
        return
    patch, scope = getattr(interpreter, "_patch_lang", None), getattr(interpreter, "_LangPatchScope", None)
    if patch is None or scope is None or not hasattr(tl.core, "is_builtin"):
        return

    def patch_unless_patched(fn):
        langs = [value for value in fn.__globals__.values() if inspect.ismodule(value) and value in (tl, tl.core)]
        if langs and not any(tl.core.is_builtin(getattr(lang, "load", None)) for lang in langs):
            return scope()  # nothing to restore
        return patch(fn)

    interpreter._patch_lang = patch_unless_patched


_nested_jit_calls_skip_patching_again()


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
