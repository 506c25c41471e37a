"""Serial tests for model building, spec validation, losses and accuracy counting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from hpcdl.data import Dataset, load_dataset
from hpcdl.models import ModelError, build_model, check_model_spec, count_correct, loss_function

TESTS_DIR = Path(__file__).resolve().parent


def make_dataset(task: str, input_shape: tuple[int, ...], num_classes: int | None, samples: int = 6) -> Dataset:
    if task == "language-model":
        x = torch.randint(0, num_classes, (samples, *input_shape))
        y = torch.randint(0, num_classes, (samples, *input_shape))
    elif task == "classification":
        x = torch.rand(samples, *input_shape)
        y = torch.randint(0, num_classes, (samples,))
    else:
        x = torch.rand(samples, *input_shape)
        y = torch.rand(samples, 1)
    return Dataset("test", task, x, y, x, y, num_classes, input_shape)


IMAGES = make_dataset("classification", (1, 8, 8), 10)
FEATURES = make_dataset("classification", (5,), 3)
REGRESSION = make_dataset("regression", (32,), None)
TOKENS = make_dataset("language-model", (16,), 128)


@pytest.fixture
def custom_models_on_path(monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS_DIR))


@pytest.mark.parametrize(
    ("spec", "dataset", "expected_shape"),
    [
        ("linear", IMAGES, (6, 10)),
        ("linear", FEATURES, (6, 3)),
        ("linear", REGRESSION, (6, 1)),
        ("linear", TOKENS, (6, 16, 128)),
        ("mlp", IMAGES, (6, 10)),
        ("mlp", REGRESSION, (6, 1)),
        ("mlp", TOKENS, (6, 16, 128)),
        ("cnn", IMAGES, (6, 10)),
        ("cnn", make_dataset("classification", (3, 28, 28), 10), (6, 10)),
        ("cnn", make_dataset("regression", (1, 5, 7), None), (6, 1)),
        ("transformer", TOKENS, (6, 16, 128)),
    ],
)
def test_model_output_shape(spec, dataset, expected_shape):
    torch.manual_seed(0)
    model = build_model(spec, dataset, hidden=16)
    model.eval()
    with torch.no_grad():
        output = model(dataset.x_train)
    assert tuple(output.shape) == expected_shape
    assert output.dtype == torch.float32


def test_models_on_real_datasets():
    digits = load_dataset("digits")
    pycode = load_dataset("pycode", chars=4_000, context=32)
    torch.manual_seed(0)
    with torch.no_grad():
        assert build_model("cnn", digits).eval()(digits.x_test[:4]).shape == (4, 10)
        assert build_model("transformer", pycode)(pycode.x_test[:2]).shape == (2, 32, 128)


def test_mlp_parameter_count_for_mnist5k():
    dataset = make_dataset("classification", (1, 28, 28), 10, samples=2)
    model = build_model("mlp", dataset, hidden=1024)
    count = sum(p.numel() for p in model.parameters())
    assert count == 784 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10


def test_models_deterministic_under_seed():
    for spec, dataset in [("mlp", FEATURES), ("cnn", IMAGES), ("transformer", TOKENS)]:
        torch.manual_seed(3)
        first = build_model(spec, dataset, hidden=16)
        torch.manual_seed(3)
        second = build_model(spec, dataset, hidden=16)
        for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
            assert torch.equal(a, b)


def test_transformer_is_flat_sequential():
    model = build_model("transformer", TOKENS, hidden=32, layers=3, heads=2)
    assert isinstance(model, nn.Sequential)
    assert len(model) == 1 + 3 + 2
    assert isinstance(model[-2], nn.LayerNorm)
    assert model[-1].out_features == 128
    # Running the stages one by one gives the same output as the whole model.
    with torch.no_grad():
        hidden = TOKENS.x_train
        for stage in model:
            hidden = stage(hidden)
        assert torch.equal(hidden, model(TOKENS.x_train))


def test_transformer_is_causal():
    torch.manual_seed(0)
    model = build_model("transformer", TOKENS, hidden=16)
    tokens = TOKENS.x_train[:1].clone()
    changed = tokens.clone()
    changed[0, 10:] = (changed[0, 10:] + 1) % 128
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    assert torch.allclose(before[0, :10], after[0, :10], atol=1e-6)
    assert not torch.allclose(before[0, 10:], after[0, 10:])


def test_transformer_rejects_bad_options():
    with pytest.raises(ModelError, match="heads"):
        build_model("transformer", TOKENS, hidden=30, heads=4)
    with pytest.raises(ModelError, match="layers"):
        build_model("transformer", TOKENS, layers=0)
    with pytest.raises(ModelError, match="dropout"):
        build_model("mlp", FEATURES, dropout=0.1)


def test_transformer_rejects_long_input():
    model = build_model("transformer", TOKENS, hidden=16)
    with pytest.raises(ValueError, match="at most 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_check_model_spec_task_fit():
    check_model_spec("transformer", "language-model")
    check_model_spec("cnn", "classification", input_shape=(1, 8, 8))
    with pytest.raises(ModelError, match="language-model"):
        check_model_spec("transformer", "classification")
    with pytest.raises(ModelError, match=r"\(C, H, W\)"):
        check_model_spec("cnn", "language-model")
    with pytest.raises(ModelError, match=r"\(32,\)"):
        check_model_spec("cnn", "regression", input_shape=(32,))
    with pytest.raises(ModelError, match="cnn"):
        build_model("cnn", REGRESSION)
    with pytest.raises(ModelError, match="unknown task"):
        check_model_spec("mlp", "ranking")


def test_unknown_model_lists_valid_names():
    with pytest.raises(ModelError, match="resnet") as info:
        check_model_spec("resnet")
    assert "transformer" in str(info.value)
    assert "package.module:factory" in str(info.value)


def test_factory_with_dataset_argument(custom_models_on_path):
    check_model_spec("custom_model:build_for_dataset", "regression")
    model = build_model("custom_model:build_for_dataset", REGRESSION, scale=2)
    assert model[1].in_features == 32
    assert model[1].out_features == 6
    assert model(REGRESSION.x_train).shape == (6, 1)


def test_factory_without_arguments(custom_models_on_path):
    model = build_model("custom_model:build_fixed", REGRESSION)
    assert isinstance(model, nn.Linear)
    assert model.in_features == 32


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("custom_model:build_not_a_module", "nn.Module"),
        ("custom_model:NOT_CALLABLE", "not a callable"),
        ("custom_model:absent", "no attribute 'absent'"),
        ("no_such_module_xyz:build", "cannot import module 'no_such_module_xyz'"),
        ("custom_model:", "malformed"),
        (":build", "malformed"),
    ],
)
def test_factory_errors(custom_models_on_path, spec, fragment):
    with pytest.raises(ModelError) as info:
        build_model(spec, REGRESSION)
    assert fragment in str(info.value)


def test_loss_functions_match_torch():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    labels = torch.tensor([0, 0])
    expected = torch.nn.functional.cross_entropy(logits, labels)
    assert torch.equal(loss_function("classification")(logits, labels), expected)

    token_logits = torch.randn(2, 3, 5)
    token_labels = torch.randint(0, 5, (2, 3))
    expected = torch.nn.functional.cross_entropy(token_logits.reshape(6, 5), token_labels.reshape(6))
    assert torch.allclose(loss_function("language-model")(token_logits, token_labels), expected)

    prediction = torch.tensor([[1.0], [3.0]])
    target = torch.tensor([[0.0], [1.0]])
    assert loss_function("regression")(prediction, target).item() == pytest.approx(2.5)

    with pytest.raises(ModelError, match="unknown task"):
        loss_function("ranking")


def test_count_correct_per_sample_and_token():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 1.0]])
    assert count_correct(logits, torch.tensor([0, 0, 0]), "classification") == (2, 3)

    token_logits = torch.zeros(2, 3, 4)
    token_logits[..., 1] = 1.0
    token_labels = torch.tensor([[1, 1, 0], [2, 1, 3]])
    assert count_correct(token_logits, token_labels, "language-model") == (3, 6)

    with pytest.raises(ModelError, match="regression"):
        count_correct(logits, logits, "regression")
