import torch

from tessera.trainer.ema import EMA


def test_ema_tracks_exponential_average_and_copies():
    model = torch.nn.Linear(3, 2)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        model.weight.fill_(1.0)
    for _ in range(10):
        ema.update(model)
    expected = 1 - 0.9**10
    assert torch.allclose(ema.shadow["weight"], torch.full((2, 3), expected))
    target = torch.nn.Linear(3, 2)
    ema.copy_to(target)
    assert torch.allclose(target.weight, torch.full((2, 3), expected))
    again = EMA(target, 0.5)
    again.load_state_dict(ema.state_dict())
    assert torch.equal(again.shadow["weight"], ema.shadow["weight"])
