"""Snapshots of everything of the user's that building or applying an operator could disturb."""

import random

import numpy as np
import torch


def snapshot(model):
    """Parameter values, ``requires_grad``, ``.grad``, train flags, buffers and RNG states."""
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "grads": {
            n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()
        },
        "training": {n: m.training for n, m in model.named_modules()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "torch_rng": torch.random.get_rng_state(),
        "numpy_rng": np.random.get_state(),
        "python_rng": random.getstate(),
        "grad_enabled": torch.is_grad_enabled(),
    }


def assert_unchanged(before, model):
    """Assert that ``model`` and the global state still match the snapshot ``before``."""
    after = snapshot(model)
    for key in ("params", "buffers"):
        assert before[key].keys() == after[key].keys(), key
        for name, tensor in before[key].items():
            assert torch.equal(tensor, after[key][name]), f"{key} {name} changed"
    for name, grad in before["grads"].items():
        assert (grad is None) == (after["grads"][name] is None), f"grad of {name} changed"
        assert grad is None or torch.equal(grad, after["grads"][name]), f"grad of {name}"
    assert before["requires_grad"] == after["requires_grad"]
    assert before["training"] == after["training"]
    assert torch.equal(before["torch_rng"], after["torch_rng"])
    numpy_before, numpy_after = before["numpy_rng"], after["numpy_rng"]
    assert numpy_before[0] == numpy_after[0]
    assert np.array_equal(numpy_before[1], numpy_after[1])
    assert numpy_before[2:] == numpy_after[2:]
    assert before["python_rng"] == after["python_rng"]
    assert before["grad_enabled"] == after["grad_enabled"]
