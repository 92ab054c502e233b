from kvcompress.engine.detokenizer import DetokenizerState, detokenize_step


def test_incremental_text_equals_a_full_decode(engine):
    tok = engine.tokenizer
    text = "Café au lait — naïve résumé, 東京 🍣 and plain ASCII words.\n  Indented line."
    ids = tok(text, add_special_tokens=False)["input_ids"]
    state = DetokenizerState()
    pieces = [detokenize_step(tok, ids[: i + 1], state) for i in range(len(ids))]
    assert "".join(pieces) == state.text == tok.decode(ids, skip_special_tokens=True)
    assert all("\ufffd" not in p for p in pieces)
