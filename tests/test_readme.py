"""The README's code example runs as written."""
import re
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

from augplug.models import SmallCNN

README = Path(__file__).resolve().parents[1] / "README.md"


def test_two_line_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    torch.manual_seed(0)
    model = SmallCNN(1, 10, img_size=8, width=4, hidden=8)
    data = TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,)))
    pairs = TensorDataset(torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,)), torch.randn(32, 1, 8, 8),
                          torch.randint(0, 10, (32,)))  # originals and their views
    ns = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1),
          "val_loader": DataLoader(data, batch_size=16), "train_loader": DataLoader(pairs, batch_size=8, shuffle=True)}
    exec(compile(blocks[0], str(README), "exec"), ns)
    refiner = ns["refiner"]
    assert refiner.step_count == 4 and refiner.stats["active"]
