import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kvcompress.eval.texts import pydoc_text


def whitespace_count(text: str) -> int:
    return len(text.split())


@pytest.fixture(scope="session")
def bpe_tokenizer() -> Tokenizer:
    """A small byte-level BPE trained in-process (no download), standing in for a model's
    tokenizer: lengths are then measured in real subword tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=800,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    text = pydoc_text()[:100_000]
    tokenizer.train_from_iterator(
        [text[i : i + 1000] for i in range(0, len(text), 1000)], trainer=trainer
    )
    return tokenizer
