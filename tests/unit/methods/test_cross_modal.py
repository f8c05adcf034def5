"""The cross-modal methods (ch. 3 and ch. 4) in one process: loss totals, the alternating schedule, packages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from retrieval.config import JobSpec
from retrieval.data.cross_modal import CrossModalDataset, cross_modal_datasets_from_spec
from retrieval.errors import BadRequestError, ConfigError, ModelNotFoundError
from retrieval.methods.cross_modal import (
    CrossModalBatch,
    CrossModalMethod,
    TextContext,
    alternating_step,
    method_for,
    tag_vectors,
)
from retrieval.methods.package import TEXT_CONTEXT_FILE, load_model_package, save_model_package
from retrieval.models.text import Vocabulary

HASHING = {
    "name": "cross_modal_hashing",
    "bits": 16,
    "feature_dim": 32,
    "text": {"kind": "bow", "hidden_dim": 32},
}
ADVERSARIAL = {
    "name": "adversarial_cross_modal",
    "embedding_dim": 32,
    "text": {"kind": "gru", "word_dim": 16, "hidden_dim": 32, "max_words": 12},
    "ranking_warmup_epochs": 1,
}


def job(method: dict[str, Any], **changes: Any) -> JobSpec:
    data: dict[str, Any] = {
        "name": "pairs",
        "method": {**method, **changes},
        "dataset": {
            "name": "digit_pairs",
            "image_size": 16,
            "augment": False,
            "cross_modal": {"size": 120, "query_size": 20, "train_size": 60, "seed": 3},
        },
        "model": {"backbone": "resnet18", "weights": None, "pooling": "gem"},
        "optimizer": {"name": "adam", "lr": 0.001, "weight_decay": 0.0},
        "train": {"epochs": 1, "batch_size": 8, "seed": 0, "embed_batch_size": 64},
        "evaluation": {"recall_ks": [1, 5], "map_top_n": 10, "precision_ns": [1, 5, 1000]},
    }
    return JobSpec.from_mapping(data, source="test")


def first_batch(method: CrossModalMethod, model: torch.nn.Module, dataset: CrossModalDataset) -> CrossModalBatch:
    images, indices = next(iter(DataLoader(dataset, batch_size=8, shuffle=False)))
    return method.make_batch(model, dataset, images, indices)


def setup(spec: JobSpec) -> tuple[CrossModalMethod, torch.nn.Module, torch.nn.Module, CrossModalDataset]:
    train = cross_modal_datasets_from_spec(spec.dataset).train
    torch.manual_seed(spec.train.seed)
    method = method_for(spec, train)
    return method, method.build_model(), method.build_discriminator(), train


def test_text_context_round_trips_through_json() -> None:
    context = TextContext(
        vocabulary=Vocabulary.build(["a three next to a seven", "two and five"]),
        tag_dim=4,
        num_labels=10,
        tag_names=("three", "seven", "ink", "paper"),
    )
    again = TextContext.from_json(context.to_json(), source="test")
    assert again.tag_dim == 4 and again.num_labels == 10 and again.tag_names == context.tag_names
    assert again.vocabulary is not None and context.vocabulary is not None
    assert again.vocabulary.words == context.vocabulary.words
    with pytest.raises(ModelNotFoundError, match=r"bad\.json"):
        TextContext.from_json('{"tag_dim": 3}', source="bad.json")


def test_hashing_total_is_the_weighted_sum_of_its_terms() -> None:
    spec = job(
        HASHING,
        code_pair_weight=0.7,
        feature_pair_weight=0.3,
        quantization_weight=2.0,
        entropy_weight=0.5,
        bit_balance_weight=0.25,
    )
    method, model, discriminator, train = setup(spec)
    batch = first_batch(method, model, train)
    terms = method.generator_terms(
        output=model(batch.images, batch.text_inputs), discriminator=discriminator, batch=batch
    )
    expected = (
        0.7 * terms["code_pair"]
        + 0.3 * terms["feature_pair"]
        + 2.0 * terms["quantization"]
        + 0.5 * (terms["feature_entropy"] + terms["code_entropy"])
        + 0.25 * terms["bit_balance"]
    )
    assert torch.allclose(terms["loss"], expected)
    # A BoW batch has one tag vector per image, the image's own.
    assert batch.owner.tolist() == list(range(8))


def test_adversarial_total_includes_the_label_term_when_weighted() -> None:
    spec = job(ADVERSARIAL, projection_weight=0.5, entropy_weight=0.2, label_weight=0.3, ranking_weight=1.5)
    method, model, discriminator, train = setup(spec)
    batch = first_batch(method, model, train)
    # Sentence encoders read every caption: five per digit-pairs image.
    assert batch.owner.tolist() == [image for image in range(8) for _ in range(5)]
    terms = method.generator_terms(
        output=model(batch.images, batch.text_inputs), discriminator=discriminator, batch=batch
    )
    expected = 1.5 * terms["ranking"] + 0.5 * terms["projection"] + 0.2 * terms["entropy"] + 0.3 * terms["label"]
    assert torch.allclose(terms["loss"], expected)


def test_label_weight_needs_labels() -> None:
    # A caption dataset without categories: its text context has no labels to classify.
    with pytest.raises(ConfigError, match="label_weight"):
        method_for(job(ADVERSARIAL, label_weight=0.5), _caption_only_dataset())


def test_bow_encoder_refuses_a_dataset_without_tags() -> None:
    with pytest.raises(ConfigError, match="bow"):
        method_for(job(HASHING), _caption_only_dataset())


def _run_steps(spec: JobSpec, steps: int) -> tuple[list[float], dict[str, torch.Tensor], dict[str, Any]]:
    method, model, discriminator, train = setup(spec)
    generator_optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    discriminator_optimizer = torch.optim.Adam(discriminator.parameters(), lr=1e-3)
    batch = first_batch(method, model, train)
    losses = []
    for _ in range(steps):
        terms, adversary = alternating_step(
            method,
            model=model,
            discriminator=discriminator,
            generator_optimizer=generator_optimizer,
            discriminator_optimizer=discriminator_optimizer,
            batch=batch,
        )
        losses.append(float(terms["loss"].detach()))
        assert 0.0 <= float(adversary["feature_accuracy"]) <= 1.0
    return losses, model.state_dict(), discriminator_optimizer.state_dict()


@pytest.mark.parametrize("method", [HASHING, ADVERSARIAL], ids=["hashing", "adversarial"])
def test_alternating_schedule_is_deterministic_and_learns(method: dict[str, Any]) -> None:
    spec = job(method, discriminator_steps=2)
    first_losses, first_state, first_adversary = _run_steps(spec, steps=6)
    again_losses, again_state, _ = _run_steps(spec, steps=6)
    assert first_losses == again_losses
    assert all(torch.equal(first_state[name], again_state[name]) for name in first_state)
    # k_M = 2: the classifiers stepped twice per step of the encoders.
    steps_taken = {int(state["step"]) for state in first_adversary["state"].values()}
    assert steps_taken == {12}
    assert first_losses[-1] < first_losses[0]


def test_free_text_becomes_a_tag_vector() -> None:
    vectors = tag_vectors(["A Three, and a SEVEN!", "nothing known"], tag_names=["three", "seven", "ink"], tag_dim=3)
    np.testing.assert_array_equal(vectors, [[1, 1, 0], [0, 0, 0]])
    with pytest.raises(ConfigError, match="3 tags"):
        tag_vectors(["x"], tag_names=["a"], tag_dim=3)


@pytest.mark.parametrize("method", [HASHING, ADVERSARIAL], ids=["hashing", "adversarial"])
def test_package_round_trip_embeds_images_and_texts(method: dict[str, Any], tmp_path: Path) -> None:
    spec = job(method)
    trained, model, _, train = setup(spec)
    folder = save_model_package(
        tmp_path / "package",
        spec=spec,
        state_dict=model.state_dict(),
        extra_files={TEXT_CONTEXT_FILE: trained.context.to_json()},
    )
    package = load_model_package(folder)
    assert package.embeds_texts
    texts = ["a three next to a seven", "", "zebra quartz " * 40]  # known, empty, unknown and over-long
    from_package = package.embed_texts(texts)
    model.eval()
    direct = trained.embed_texts(model, texts).numpy()
    np.testing.assert_allclose(from_package, direct, rtol=1e-5, atol=1e-6)
    images = [train.load_image(index) for index in range(3)]
    image_vectors = package.embed_images(images)
    if method is HASHING:
        assert package.code_bits == 16 and package.dim == 16
        assert from_package.shape == (3, 16) and set(np.unique(from_package)) <= {-1.0, 1.0}
        assert set(np.unique(image_vectors)) <= {-1.0, 1.0}
    else:
        assert package.code_bits is None and image_vectors.shape == (3, 32)
        np.testing.assert_allclose(np.linalg.norm(from_package, axis=1), 1.0, rtol=1e-5)

    (folder / TEXT_CONTEXT_FILE).unlink()
    with pytest.raises(ModelNotFoundError, match=TEXT_CONTEXT_FILE):
        load_model_package(folder)


def test_an_image_only_package_refuses_text(tmp_path: Path) -> None:
    from retrieval.methods.registry import build_method

    spec = JobSpec.from_mapping(
        {
            "name": "digits",
            "method": {"name": "deep_metric"},
            "model": {"backbone": "resnet18", "weights": None, "embedding_dim": 8},
        },
        source="test",
    )
    folder = save_model_package(tmp_path / "p", spec=spec, state_dict=build_method(spec).build_model().state_dict())
    package = load_model_package(folder)
    assert not package.embeds_texts and package.code_bits is None
    with pytest.raises(BadRequestError, match="embeds images only"):
        package.embed_texts(["a three"])


def test_scores_name_both_directions() -> None:
    spec = job(HASHING)
    method, model, _, _ = setup(spec)
    splits = cross_modal_datasets_from_spec(spec.dataset)
    query = method.encode_split(model, splits.query, batch_size=64)
    retrieval = method.encode_split(model, splits.retrieval, batch_size=64)
    assert query.images.shape == (20, 16) and query.texts.shape == (20, 16)
    scores = method.score(query, retrieval)
    assert scores["map@all"] == pytest.approx(0.5 * (scores["i2t/map@all"] + scores["t2i/map@all"]))
    # P@1000 asks beyond the 100 retrieval items: it counts the whole set, under the name asked for.
    assert {"i2t/map@10", "t2i/map@10", "i2t/p@5", "t2i/p@1", "i2t/p@1000"} <= set(scores)

    spec = job(ADVERSARIAL)
    method, model, _, _ = setup(spec)
    query = method.encode_split(model, splits.query, batch_size=64)
    assert query.texts.shape == (100, 32) and query.owner.tolist() == [i for i in range(20) for _ in range(5)]
    scores = method.score(query, query)
    assert scores["rsum"] == pytest.approx(sum(value for key, value in scores.items() if "recall@" in key))


def _caption_only_dataset() -> CrossModalDataset:
    pixels = np.zeros((8, 8), dtype=np.uint8)
    from retrieval.data.base import ArrayImageLoader

    return CrossModalDataset(
        loaders=[ArrayImageLoader(pixels=pixels) for _ in range(4)],
        captions=[["a dog runs"], ["a cat sits"], ["two dogs"], ["a bird"]],
        tags=None,
        labels=None,
        label_names=[],
        tag_names=[],
        sources=[f"caption:{index}" for index in range(4)],
    )


def _reference_balanced_accuracy(
    method: CrossModalMethod, model: torch.nn.Module, discriminator: Any, datasets: list[Any]
) -> dict[str, float]:
    """Plain-loop reference: embed in small batches, classify each row alone, average the two modalities' hit rates."""
    heads = {"feature_accuracy": discriminator.features}
    if discriminator.codes is not None:
        heads["code_accuracy"] = discriminator.codes
    hits: dict[tuple[str, int], list[bool]] = {(name, modality): [] for name in heads for modality in (0, 1)}
    model.eval()
    with torch.no_grad():
        for dataset in datasets:
            for images, indices in DataLoader(dataset, batch_size=25, shuffle=False):
                batch = method.make_batch(model, dataset, images, indices)
                output = model(batch.images, batch.text_inputs)
                inputs = {
                    ("feature_accuracy", 0): output.image_features,
                    ("feature_accuracy", 1): output.text_features,
                    ("code_accuracy", 0): output.image_codes,
                    ("code_accuracy", 1): output.text_codes,
                }
                for (name, modality), values in inputs.items():
                    if name not in heads:
                        continue
                    assert values is not None
                    for row in values:
                        predicted = int(heads[name](row.unsqueeze(0))[0].argmax())
                        hits[(name, modality)].append(predicted == modality)
    return {name: 0.5 * sum(sum(hits[(name, m)]) / len(hits[(name, m)]) for m in (0, 1)) for name in heads}


@pytest.mark.parametrize("method", [HASHING, ADVERSARIAL], ids=["hashing", "adversarial"])
def test_held_out_modality_accuracy_matches_a_plain_loop(method: dict[str, Any]) -> None:
    from retrieval.methods.cross_modal import modality_accuracy

    spec = job(method)
    method_, model, discriminator, train = setup(spec)
    generator_optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    discriminator_optimizer = torch.optim.Adam(discriminator.parameters(), lr=1e-3)
    batch = first_batch(method_, model, train)
    for _ in range(2):
        alternating_step(
            method_,
            model=model,
            discriminator=discriminator,
            generator_optimizer=generator_optimizer,
            discriminator_optimizer=discriminator_optimizer,
            batch=batch,
        )
    splits = cross_modal_datasets_from_spec(spec.dataset)
    query = method_.encode_split(model, splits.query, batch_size=64)
    retrieval = method_.encode_split(model, splits.retrieval, batch_size=64)
    scores = modality_accuracy(discriminator, [query, retrieval])
    expected = _reference_balanced_accuracy(method_, model, discriminator, [splits.query, splits.retrieval])
    assert set(scores) == ({"feature_accuracy", "code_accuracy"} if method_.hashing else {"feature_accuracy"})
    for name, value in expected.items():
        assert scores[name] == pytest.approx(value, abs=1e-9)
    if method_.hashing:
        # What the code classifier reads is the relaxed code, not the sign code retrieval uses.
        assert query.image_codes is not None and np.all(np.abs(query.image_codes) < 1.0)


def test_held_out_modality_accuracy_is_balanced_over_the_modalities() -> None:
    """Five captions per image: a classifier that always answers "image" scores 0.5, not 1/6."""
    from retrieval.methods.cross_modal import modality_accuracy

    spec = job(ADVERSARIAL)
    method, model, discriminator, _ = setup(spec)
    query = method.encode_split(model, cross_modal_datasets_from_spec(spec.dataset).query, batch_size=64)
    assert len(query.texts) == 5 * len(query.images)
    last = discriminator.features.layers[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([1.0, 0.0]))  # always "image"
    assert modality_accuracy(discriminator, [query])["feature_accuracy"] == pytest.approx(0.5)
    with torch.no_grad():
        last.bias.copy_(torch.tensor([0.0, 1.0]))  # always "text"
    assert modality_accuracy(discriminator, [query])["feature_accuracy"] == pytest.approx(0.5)


def test_score_model_adds_the_held_out_modality_accuracy() -> None:
    from retrieval.methods.cross_modal import modality_accuracy, score_model

    spec = job(HASHING)
    method, model, discriminator, _ = setup(spec)
    splits = cross_modal_datasets_from_spec(spec.dataset)
    without = score_model(method, model, spec=spec, splits=splits)
    assert not any(key.startswith("disc/") for key in without)
    scores = score_model(method, model, spec=spec, splits=splits, discriminator=discriminator)
    query = method.encode_split(model, splits.query, batch_size=64)
    retrieval = method.encode_split(model, splits.retrieval, batch_size=64)
    expected = modality_accuracy(discriminator, [query, retrieval])
    assert scores["disc/feature_accuracy"] == pytest.approx(expected["feature_accuracy"])
    assert scores["disc/code_accuracy"] == pytest.approx(expected["code_accuracy"])
    assert scores["map@all"] == pytest.approx(without["map@all"])


def test_modality_accuracy_refuses_a_split_without_features() -> None:
    from retrieval.methods.cross_modal import EncodedSplit, modality_accuracy

    spec = job(HASHING)
    _, _, discriminator, _ = setup(spec)
    bare = EncodedSplit(
        images=np.ones((2, 16), np.float32), texts=np.ones((2, 16), np.float32), owner=np.arange(2), image_labels=None
    )
    with pytest.raises(ValueError, match="features"):
        modality_accuracy(discriminator, [bare])
    with pytest.raises(ValueError, match="at least one"):
        modality_accuracy(discriminator, [])
