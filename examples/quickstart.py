"""paramreg quickstart: a sparse CNN on scikit-learn's 8x8 digits, with your own training loop.

What it shows:
  1. ``paramreg.attach`` selects weights by name ("conv*.weight", "fc*.weight") and asks for the
     whole recipe in one call: 90% of those weights exactly zero (``sparsity=0.9``) in a run of
     ``total_steps`` optimizer steps. Nothing is zeroed in the first quarter; the fraction ramps up
     to 90% by three quarters (hard thresholding in the optimizer's step, right after every
     ``optimizer.step()``); the zeros are then kept while every other weight trains on.
  2. A plain PyTorch loop trains the model; nothing paramreg-specific happens in it.
  3. ``paramreg.report`` prints per-tensor sparsity, the target and the step policy that ran;
     ``paramreg.remove`` turns the model back into a plain ``nn.Module`` whose state_dict loads
     into a fresh, paramreg-free model.

Run it (CPU, well under a minute, no download):

    python examples/quickstart.py
"""

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from tqdm import tqdm

import paramreg

SPARSITY = 0.9  # the fraction of the selected weights to be exactly zero
LR = 0.05
EPOCHS = 12  # the whole run: the ramp from a quarter to three quarters of it, then the zeros kept
BATCH_SIZE = 32


def load_data():
    """8x8 digit images scaled to [0, 1], split 80/20 with a fixed seed."""
    digits = load_digits()
    x = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)  # (N, 1, 8, 8)
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.2, stratify=y, random_state=0)
    return x_train, x_test, y_train, y_test


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.fc1 = nn.Linear(32 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, 10)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 8x8 -> 4x4
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)


def train(model, x, y, epochs, desc):
    """An ordinary training loop: nothing paramreg-specific happens here."""
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)
    bar = tqdm(range(epochs), desc=desc, unit="epoch")
    for _ in bar:
        model.train()
        losses = []
        for batch in torch.randperm(len(x)).split(BATCH_SIZE):
            loss = F.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()  # paramreg's proximal step (or projection) runs right after this
            losses.append(loss.item())
        bar.set_postfix(loss=f"{sum(losses) / len(losses):.4f}")  # mean loss of the epoch


@torch.no_grad()
def logits_of(model, x):
    model.eval()
    return model(x)


def accuracy_of(model, x, y):
    return (logits_of(model, x).argmax(1) == y).float().mean().item()


def main():
    torch.manual_seed(0)
    torch.set_num_threads(2)
    x_train, x_test, y_train, y_test = load_data()

    model = SmallCNN()
    targets = ["conv*.weight", "fc*.weight"]
    steps = EPOCHS * -(-len(x_train) // BATCH_SIZE)  # optimizer steps in EPOCHS
    names = paramreg.attach(model, targets, sparsity=SPARSITY, total_steps=steps)
    print(f"{', '.join(names)}: {model.conv1.parametrizations.weight[0]}")
    train(model, x_train, y_train, EPOCHS, "the sparsity recipe")
    report = paramreg.report(model)
    logits = logits_of(model, x_test)
    accuracy = (logits.argmax(1) == y_test).float().mean().item()
    print(f"reached: {report.targets[0].reached:.1%} zero by step {round(0.75 * steps)}")
    print(f"after {steps} steps, zeros kept: {report.sparsity:.1%} zero, test accuracy: {accuracy:.3f}")
    print(report)

    # Fold the constraint away: a plain SmallCNN with plain state_dict keys, zeros kept.
    paramreg.remove(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "small_cnn.pt"
        torch.save(model.state_dict(), path)
        fresh = SmallCNN()
        fresh.load_state_dict(torch.load(path, weights_only=True))  # strict: keys must match

    if not torch.equal(logits_of(fresh, x_test), logits):
        raise SystemExit("reloaded plain state_dict: predictions DIFFER from the trained model")
    print("reloaded plain state_dict: predictions identical")


if __name__ == "__main__":
    main()
