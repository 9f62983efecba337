"""The case matrix of the operator tests: models × losses × reductions × batchings.

Every case is small (``D ≤ 100``, 15 examples), float64, seeded and in eval mode, so each
dense reference takes milliseconds. ``Case("mlp", "ce", "mean", "uneven").build()``
returns ``(model, loss_func, params, data)``; :attr:`Case.options` holds the extra keyword
arguments an operator needs for it (``batch_size_fn`` for dict inputs).
"""

import itertools
from dataclasses import dataclass

import torch
from torch import nn

F64 = torch.float64
NUM_EXAMPLES = 15
UNEVEN_SPLIT = (7, 5, 3)

LOSSES = {"mse": nn.MSELoss, "ce": nn.CrossEntropyLoss, "bce": nn.BCEWithLogitsLoss}
MODELS = ("mlp", "cnn", "sequence", "subset")
REDUCTIONS = ("sum", "mean")
#: ``one``: a single batch of 15; ``uneven``: the same data as batches of 7, 5 and 3;
#: ``dict``: the uneven batches with inputs ``{"x": X}`` (needs ``batch_size_fn``).
BATCHINGS = ("one", "uneven", "dict")


class SequenceModel(nn.Module):
    """One ``Linear`` shared over a sequence of 3 positions (weight sharing), then a head.

    Input ``(N, T=3, 3)``, output ``(N, T, 2)``; cross-entropy needs classes on axis 1,
    so with ``channels_first`` the output is permuted to ``(N, 2, T)``.
    """

    def __init__(self, channels_first):
        super().__init__()
        self.shared = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)
        self.channels_first = channels_first

    def forward(self, x):
        out = self.head(torch.tanh(self.shared(x)))
        return out.permute(0, 2, 1) if self.channels_first else out


class DictInput(nn.Module):
    """Apply ``net`` to ``batch["x"]``: a model whose inputs are not a single tensor."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, batch):
        return self.net(batch["x"])


def dict_batch_size(inputs):
    """``batch_size_fn`` for :class:`DictInput` batches."""
    return inputs["x"].shape[0]


def mlp():
    """``Sequential(Linear(4, 5), Tanh(), Linear(5, 3))``: D = 43."""
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def build_model(name, loss):
    """Return ``(model, inputs)`` for a model name (model in float64 and eval mode)."""
    if name in ("mlp", "subset"):
        model, inputs = mlp(), torch.randn(NUM_EXAMPLES, 4)
    elif name == "cnn":
        # 2×6×6 → conv 3×4×4 → max-pool 3×2×2 → 12 → 3: D = 57 + 39 = 96.
        model = nn.Sequential(
            nn.Conv2d(2, 3, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(12, 3)
        )
        inputs = torch.randn(NUM_EXAMPLES, 2, 6, 6)
    elif name == "sequence":
        model, inputs = SequenceModel(channels_first=loss == "ce"), torch.randn(NUM_EXAMPLES, 3, 3)
    else:
        raise ValueError(f"unknown model {name!r}")
    return model.to(F64).eval(), inputs.to(F64)


def build_targets(loss, outputs):
    """Return targets of the right kind and shape for ``outputs``.

    MSE: real, shaped like the outputs; CE: integer labels ``(N, d1, …)`` for outputs
    ``(N, C, d1, …)``; BCE: probabilities in ``[0, 1]`` shaped like the outputs.
    """
    if loss == "ce":
        labels_shape = (outputs.shape[0],) + tuple(outputs.shape[2:])
        return torch.randint(0, outputs.shape[1], labels_shape)
    if loss == "bce":
        return torch.rand(outputs.shape, dtype=F64)
    return torch.randn(outputs.shape, dtype=F64)


@dataclass(frozen=True)
class Case:
    """One test problem; :meth:`build` returns ``(model, loss_func, params, data)``."""

    model: str
    loss: str
    reduction: str
    batching: str

    @property
    def id(self):
        """Readable test id such as ``"mlp-ce-mean-uneven"``."""
        return f"{self.model}-{self.loss}-{self.reduction}-{self.batching}"

    @property
    def options(self):
        """Keyword arguments an operator needs for this case besides the four positional."""
        return {"batch_size_fn": dict_batch_size} if self.batching == "dict" else {}

    def with_batching(self, batching):
        """The same problem (same weights and data) with another batching."""
        return Case(self.model, self.loss, self.reduction, batching)

    def build(self, seed=0):
        """Build the problem; the global torch RNG is left as it was."""
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model, inputs = build_model(self.model, self.loss)
            with torch.no_grad():
                targets = build_targets(self.loss, model(inputs))
        params = list(model.parameters())
        if self.model == "subset":
            # last layer's weight, then first layer's bias: not adjacent, not in model order
            params = [model[2].weight, model[0].bias]
        if self.batching == "one":
            data = [(inputs, targets)]
        else:
            data = list(zip(inputs.split(UNEVEN_SPLIT), targets.split(UNEVEN_SPLIT), strict=True))
        if self.batching == "dict":
            model = DictInput(model).eval()
            data = [({"x": x}, y) for x, y in data]
        return model, LOSSES[self.loss](reduction=self.reduction), params, data


def _keep(case):
    """Prune the product.

    Dict inputs only test the input plumbing, so they run on the MLP only; the parameter
    subset only tests the flattening, so it runs with uneven batches only.
    """
    if case.batching == "dict":
        return case.model == "mlp"
    if case.model == "subset":
        return case.batching == "uneven"
    return True


CASES = [
    case
    for case in itertools.starmap(Case, itertools.product(MODELS, LOSSES, REDUCTIONS, BATCHINGS))
    if _keep(case)
]


def ignore_some_labels(data, ignore_index=-100):
    """Copy of cross-entropy ``data`` with labels ``(N, T)`` and a few set to ``ignore_index``.

    One position of example 0 and all positions of example 1 are ignored.
    """
    (x, y), *rest = data
    y = y.clone()
    y[0, 0] = ignore_index
    y[1, :] = ignore_index
    return [(x, y), *rest]
