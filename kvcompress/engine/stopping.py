"""When a request is done: EOS or a stop token, a stop string, or a length limit."""

from __future__ import annotations

from collections.abc import Set
from typing import Any

from kvcompress.engine.detokenizer import detokenize_step
from kvcompress.engine.sequence import Sequence, SequenceStatus


def check_stop(
    seq: Sequence, token: int, tokenizer: Any, eos_token_ids: Set[int], max_model_len: int
) -> None:
    """Detokenize ``seq``'s newest ``token`` and finish the sequence if it must stop.

    A stop string is cut from the text, as OpenAI's API does.
    """
    sp = seq.sampling
    detokenize_step(tokenizer, seq.output_token_ids, seq.detokenizer)
    text = seq.detokenizer.text
    if (token in eos_token_ids and not sp.ignore_eos) or token in sp.stop_token_ids:
        _finish(seq, text, "stop")
        return
    for stop in sp.stop:
        at = text.find(stop)
        if at >= 0:
            _finish(seq, text[:at], "stop")
            return
    seq.output_text = text
    if len(seq.output_token_ids) >= sp.max_tokens or seq.num_tokens >= max_model_len:
        _finish(seq, text, "length")


def _finish(seq: Sequence, text: str, reason: str) -> None:
    seq.output_text = text
    seq.status = SequenceStatus.FINISHED
    seq.finish_reason = reason
