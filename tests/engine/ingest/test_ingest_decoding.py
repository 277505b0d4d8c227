"""Bytes to text: which encodings are recognised, and what counts as binary."""

from __future__ import annotations

import codecs

from kimi_desk.engine.ingest.decoding import decode_text


def test_utf8_with_and_without_bom_and_line_ends_normalised():
    assert decode_text("naïve\r\nzweite\rdritte\n".encode()).text == "naïve\nzweite\ndritte\n"
    assert decode_text(codecs.BOM_UTF8 + b"x").text == "x"


def test_multibyte_text_is_never_cut_into_a_false_binary_verdict():
    # A probe that stops at a fixed byte count can split a character; the whole file is decoded.
    text = "漢字かな交じり文。" * 500
    decoded = decode_text(text.encode())
    assert decoded is not None and decoded.text == text


def test_utf16_and_utf32_need_their_bom():
    assert decode_text(codecs.BOM_UTF16_LE + "wide text".encode("utf-16-le")).text == "wide text"
    assert decode_text(codecs.BOM_UTF32_LE + "wider".encode("utf-32-le")).text == "wider"
    # Without a BOM, UTF-16's NUL bytes mark it as binary: too ambiguous to guess.
    assert decode_text("wide text".encode("utf-16-le")) is None


def test_legacy_8_bit_text_is_accepted_only_without_control_characters():
    assert decode_text("café".encode("cp1252")).encoding == "cp1252"
    assert decode_text(b"caf\xe9 \x01\x02\x03") is None
    assert decode_text(b"\x81\x8d\x8f") is None


def test_nul_bytes_mean_binary():
    assert decode_text(b"text\x00more") is None
