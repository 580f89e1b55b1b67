"""The usage patterns of the README: originals through their own forward, concatenated with the
augmented rows' logits, are one batch to the refiner (the recommended form of the separate pattern)."""
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from augplug import AugmentationRefiner
from augplug.scores import last_layer_scores


def test_two_forwards_concatenated_are_one_batch():
    """Each forward keeps its own BatchNorm statistics; the refiner reads the classifier features of
    both forwards, in order, and scores the views from them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    g = torch.Generator().manual_seed(0)
    val = DataLoader(TensorDataset(torch.randn(64, 6, generator=g), torch.randint(0, 3, (64,), generator=g)),
                     batch_size=32)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    r = AugmentationRefiner(model, opt, val, schedule=dict(refresh_every=1))
    for step in range(3):
        x, y = torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
        x_aug, y_aug = torch.randn(24, 6, generator=g), torch.randint(0, 3, (24,), generator=g)
        logits = torch.cat([model(x), model(x_aug)])  # two training forwards
        with torch.no_grad():  # what the head received in each forward (not captured: no grad)
            features = torch.cat([model[:3](x), model[:3](x_aug)])
        loss = r(logits, torch.cat([y, y_aug]), num_original=16)
        v = r.validation_direction
        expected = last_layer_scores(features[16:], logits[16:], v["3.weight"], v["3.bias"])
        torch.testing.assert_close(r.stats["scores"][16:], expected, rtol=1e-5, atol=1e-6)
        assert float((r.stats["weights"][16:] - 1).abs().max()) > 1e-4  # the views were refined
        opt.zero_grad()
        loss.backward()
        opt.step()
