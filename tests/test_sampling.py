import numpy as np
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from specx.errors import InvalidArgumentError
from specx.runtime.sampling import SamplingConfig, choose_token, sample, target_distribution


def _hf_probs(logits, temperature, top_k, top_p):
    scores = torch.from_numpy(logits.astype(np.float64))[None]
    for warper in (TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k) if top_k else None,
                   TopPLogitsWarper(top_p) if top_p < 1 else None):
        if warper is not None:
            scores = warper(None, scores)
    return torch.softmax(scores, -1)[0].numpy()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 10, 1.0), (1.0, 0, 0.9), (1.3, 20, 0.8)])
def test_processing_matches_transformers(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(0, 3, 200).astype(np.float32)
    ours = target_distribution(logits, SamplingConfig(temperature, top_k, top_p))
    np.testing.assert_allclose(ours, _hf_probs(logits, temperature, top_k, top_p), atol=1e-12)
    assert ours.dtype == np.float64 and abs(ours.sum() - 1) < 1e-12


def test_greedy_is_one_hot_argmax():
    logits = np.array([0.1, 2.0, -1.0, 2.0], dtype=np.float32)
    probs = target_distribution(logits, SamplingConfig())
    assert probs.tolist() == [0, 1, 0, 0]  # ties go to the first index, like torch.argmax
    assert choose_token(logits, SamplingConfig(), np.random.default_rng(0)) == 1


def test_sample_frequencies():
    probs = np.array([0.5, 0.3, 0.2, 0.0])
    rng = np.random.default_rng(1)
    counts = np.bincount([sample(probs, rng) for _ in range(20000)], minlength=4) / 20000
    np.testing.assert_allclose(counts, probs, atol=0.015)
    assert counts[3] == 0


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"temperature": float("nan")}, {"top_k": -2},
                                    {"top_p": 0.0}, {"top_p": 1.5}])
def test_invalid_values(kwargs):
    with pytest.raises(InvalidArgumentError):
        SamplingConfig(**kwargs)
