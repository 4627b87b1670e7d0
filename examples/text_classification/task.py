"""A synthetic but learnable text task with its own tiny vocabulary (nothing is downloaded).

Each review is `[CLS]` + 15 tokens of filler with two to four sentiment words, some negated by a
preceding "not". The label is 1 when the negation-aware polarity sum is positive, else 0 (ties are
re-drawn). Bag-of-words gets most of it; the negations need context, which is where capacity helps.
"""

from __future__ import annotations

import torch

POSITIVE = ["good", "great", "fun", "love", "superb"]
NEGATIVE = ["bad", "dull", "awful", "hate", "boring"]
FILLER = ["the", "a", "movie", "plot", "actor", "was", "is", "and", "it", "this", "film", "story", "very", "quite",
          "with", "of", "scene", "ending", "music", "cast"]
VOCAB = ["[PAD]", "[CLS]", "not", *POSITIVE, *NEGATIVE, *FILLER]
TOKEN = {word: i for i, word in enumerate(VOCAB)}
SEQ_LEN = 16
NUM_LABELS = 2


def make_reviews(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` reviews as token ids [n, SEQ_LEN] and labels [n]; the same seed gives the same data."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.empty(n, SEQ_LEN, dtype=torch.long)
    labels = torch.empty(n, dtype=torch.long)
    filler = torch.tensor([TOKEN[w] for w in FILLER])
    i = 0
    while i < n:
        row = filler[torch.randint(len(FILLER), (SEQ_LEN,), generator=g)]
        row[0] = TOKEN["[CLS]"]
        k = int(torch.randint(2, 5, (), generator=g))
        slots = (torch.randperm((SEQ_LEN - 1) // 2, generator=g)[:k] * 2 + 2).tolist()  # pairs (maybe "not", word)
        polarity = 0
        for slot in slots:
            positive = bool(torch.rand((), generator=g) < 0.5)
            words = POSITIVE if positive else NEGATIVE
            row[slot] = TOKEN[words[int(torch.randint(len(words), (), generator=g))]]
            negated = bool(torch.rand((), generator=g) < 0.3)
            if negated:
                row[slot - 1] = TOKEN["not"]
            polarity += (1 if positive else -1) * (-1 if negated else 1)
        if polarity == 0:
            continue
        ids[i], labels[i] = row, int(polarity > 0)
        i += 1
    return ids, labels


def as_records(ids: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """The dict-per-example form `transformers.Trainer` expects."""
    mask = torch.ones(SEQ_LEN, dtype=torch.long)
    return [{"input_ids": x, "attention_mask": mask, "labels": y} for x, y in zip(ids, labels)]


def tiny_bert_config():
    """A BERT small enough to train on a laptop CPU in seconds, randomly initialised."""
    import transformers

    return transformers.BertConfig(
        vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=SEQ_LEN, num_labels=NUM_LABELS, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )


def decode(ids: torch.Tensor) -> str:
    return " ".join(VOCAB[i] for i in ids.tolist())
