import pytest

from kvcompress.eval.texts import as_token_counter, pydoc_text, read_text, text_slice
from tests.eval.conftest import whitespace_count


def test_pydoc_text_is_long_and_deterministic():
    from pydoc_data.topics import topics

    text = pydoc_text()
    assert len(text) > 300_000
    assert text.startswith(topics[min(topics)].strip()[:200])
    assert text == "\n\n".join(topics[k].strip() for k in sorted(topics))


def test_read_text(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("héllo wörld", encoding="utf-8")
    assert read_text(path) == "héllo wörld"
    with pytest.raises(FileNotFoundError, match=r"missing\.txt"):
        read_text(tmp_path / "missing.txt")


def test_text_slice_whitespace():
    text = "a b c d e f"
    assert text_slice(text, whitespace_count, 2) == "a b"
    assert text_slice(text, whitespace_count, 2, offset=1) == "b c"
    assert text_slice(text, whitespace_count, 10, offset=4) == "e f"
    assert text_slice(text, whitespace_count, 0) == ""
    with pytest.raises(ValueError):
        text_slice(text, whitespace_count, -1)


def test_text_slice_tokenizer(bpe_tokenizer):
    def count(text: str) -> int:
        return len(bpe_tokenizer.encode(text, add_special_tokens=False).ids)

    text = pydoc_text()
    first = text_slice(text, bpe_tokenizer, 1000)
    later = text_slice(text, bpe_tokenizer, 1000, offset=5000)
    assert first != later
    for window in (first, later):
        assert 950 <= count(window) <= 1000
    assert " ".join(text.split()).startswith(first)
    assert later in " ".join(text.split())


def test_as_token_counter(bpe_tokenizer):
    assert as_token_counter(whitespace_count)("a b c") == 3
    assert as_token_counter(bpe_tokenizer)("") == 0
    with pytest.raises(TypeError):
        as_token_counter(3)  # type: ignore[arg-type]
