"""The case matrix of the operator tests: models × losses × reductions × batchings."""

import itertools
from dataclasses import dataclass

import torch
from torch import nn

F64 = torch.float64
NUM_EXAMPLES = 15
UNEVEN_SPLIT = (7, 5, 3)


class SequenceModel(nn.Module):
    """One ``Linear`` shared over a sequence of 3 positions (weight sharing), then a head.

    CE needs outputs ``(N, C, T)``, the others keep ``(N, T, C)``.
    """

    def __init__(self, channels_first):
        super().__init__()
        self.shared = nn.Linear(3, 4)
        self.head = nn.Linear(4, 2)
        self.channels_first = channels_first

    def forward(self, x):
        out = self.head(torch.tanh(self.shared(x)))
        return out.permute(0, 2, 1) if self.channels_first else out


def build_model(name, loss):
    """Return ``(model, inputs, output_shape_per_example)`` for a model name."""
    if name in ("mlp", "subset"):
        model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
        inputs = torch.randn(NUM_EXAMPLES, 4)
    elif name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(2, 2, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 3)
        )
        inputs = torch.randn(NUM_EXAMPLES, 2, 4, 4)
    else:
        model = SequenceModel(channels_first=loss == "ce")
        inputs = torch.randn(NUM_EXAMPLES, 3, 3)
    return model.to(F64).eval(), inputs.to(F64)


def build_targets(loss, outputs):
    """Return targets of the right kind and shape for ``outputs``."""
    if loss == "ce":
        labels_shape = (outputs.shape[0],) + tuple(outputs.shape[2:])
        return torch.randint(0, outputs.shape[1], labels_shape)
    if loss == "bce":
        return torch.rand(outputs.shape, dtype=F64)
    return torch.randn(outputs.shape, dtype=F64)


LOSSES = {"mse": nn.MSELoss, "ce": nn.CrossEntropyLoss, "bce": nn.BCEWithLogitsLoss}


@dataclass(frozen=True)
class Case:
    """One test problem; :meth:`build` returns ``(model, loss_func, params, data)``."""

    model: str
    loss: str
    reduction: str
    batching: str

    @property
    def id(self):
        return f"{self.model}-{self.loss}-{self.reduction}-{self.batching}"

    def build(self, seed=0):
        torch.manual_seed(seed)
        model, inputs = build_model(self.model, self.loss)
        with torch.no_grad():
            targets = build_targets(self.loss, model(inputs))
        params = list(model.parameters())
        if self.model == "subset":
            params = [model[2].weight, model[0].bias]
        if self.batching == "one":
            data = [(inputs, targets)]
        else:
            data = list(zip(inputs.split(UNEVEN_SPLIT), targets.split(UNEVEN_SPLIT), strict=True))
        return model, LOSSES[self.loss](reduction=self.reduction), params, data


def _keep(case):
    """Prune the product: the subset case needs only one loss; others run every combination."""
    return case.model != "subset" or case.loss == "ce"


CASES = [
    case
    for case in itertools.starmap(
        Case,
        itertools.product(
            ["mlp", "cnn", "sequence", "subset"], LOSSES, ["sum", "mean"], ["one", "uneven"]
        ),
    )
    if _keep(case)
]
