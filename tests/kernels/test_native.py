"""Building and loading our C kernels (kernels/native.py): built once into the cache folder and loaded
from it after; a source that does not compile, a missing compiler or a CPU without AVX2 give None and a
one-line reason, never an exception."""

import ctypes

import pytest
from test_quant_avx2 import can_build

from kimi_desk.kernels import native

GOOD = "int cpu_supported(void) { return 1; }\nint add(int a, int b) { return a + b; }\n"


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setattr(native, "cache_folder", lambda: folder)
    return folder


def test_builds_once_then_loads(tmp_path, cache):
    if not can_build():
        pytest.skip("no C compiler or no AVX2 here")
    source = tmp_path / "adder.c"
    source.write_text(GOOD)
    lib = native.library(source)
    assert lib.add(ctypes.c_int(2), ctypes.c_int(3)) == 5
    (built,) = cache.glob("adder-*.so")
    stamp = built.stat().st_mtime_ns
    native.library.cache_clear()
    assert native.library(source) is not None and built.stat().st_mtime_ns == stamp
    assert native.reason(source) is None
    # A changed source is a new file, not the old one reused.
    source.write_text(GOOD + "int sub(int a, int b) { return a - b; }\n")
    native.library.cache_clear()
    assert native.library(source).sub(ctypes.c_int(5), ctypes.c_int(3)) == 2
    assert len(list(cache.glob("adder-*.so"))) == 2


def test_a_changed_shared_header_rebuilds(tmp_path, cache, monkeypatch):
    """The sources include the shared header: a change to it alone gives a new build."""
    if not can_build():
        pytest.skip("no C compiler or no AVX2 here")
    header = tmp_path / "shared.h"
    header.write_text("#define THREE 3\n")
    monkeypatch.setattr(native, "HEADERS", (header,))
    source = tmp_path / "adder.c"
    source.write_text('#include "shared.h"\n' + GOOD + "int three(void) { return THREE; }\n")
    assert native.library(source).three() == 3
    header.write_text("#define THREE 4\n")
    native.library.cache_clear()
    assert native.library(source).three() == 4
    assert len(list(cache.glob("adder-*.so"))) == 2


def test_the_shared_header_is_hashed():
    assert [h.name for h in native.HEADERS] == ["avx2_math.h"]


def test_a_failed_build_says_why(tmp_path, cache):
    if not can_build():
        pytest.skip("no C compiler or no AVX2 here")
    source = tmp_path / "broken.c"
    source.write_text("this is not C\n")
    assert native.library(source) is None
    assert native.reason(source).startswith("the C compiler failed on broken.c")
    assert not list(cache.glob("broken-*.so"))


def test_a_cpu_the_code_refuses_is_not_used(tmp_path, cache):
    if not can_build():
        pytest.skip("no C compiler or no AVX2 here")
    source = tmp_path / "refuses.c"
    source.write_text("int cpu_supported(void) { return 0; }\n")
    assert native.library(source) is None and native.reason(source) == "this CPU lacks AVX2 or FMA"


def test_no_compiler(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(native, "compiler", lambda: None)
    source = tmp_path / "nocc.c"
    source.write_text(GOOD)
    assert native.library(source) is None
    # On x86-64 with AVX2 the compiler is what is missing; elsewhere the CPU is named first.
    assert native.reason(source) == native._unavailable() is not None


def test_a_recording_notes_this_threads_calls_and_makes_them_again(tmp_path, cache):
    """native.recording: each call the recording thread makes is noted and made again by calling the
    note (a status below zero raises); calls from another thread are not noted."""
    import threading

    if not can_build():
        pytest.skip("no C compiler or no AVX2 here")
    source = tmp_path / "counter.c"
    source.write_text(GOOD + "int count = 0;\nint bump(int by) { count += by; return by; }\n")
    lib = native.library(source)
    lib.bump.argtypes = [ctypes.c_int]
    lib.bump.restype = ctypes.c_int
    calls = []
    with native.recording(calls):
        lib.bump(2)
        elsewhere = threading.Thread(target=lib.bump, args=(5,))
        elsewhere.start()
        elsewhere.join()
        lib.bump(-1)
    assert len(calls) == 2
    counter = ctypes.c_int.in_dll(lib._cdll, "count")
    assert counter.value == 6
    calls[0]()
    assert counter.value == 8
    with pytest.raises(MemoryError, match="bump"):
        calls[1]()
