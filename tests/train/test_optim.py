"""AdamW's parameter groups: decay on matrices only, and learning-rate factors per parameter."""
import torch

from picochat.train.optim import make_optimizer


class TwoPart(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.vision = torch.nn.Linear(3, 4)
        self.lm = torch.nn.Linear(4, 2)


def test_without_factors_there_are_the_two_decay_groups():
    opt = make_optimizer(TwoPart(), 1e-3, 0.1, (0.9, 0.95), "cpu")
    assert [(len(g["params"]), g["weight_decay"]) for g in opt.param_groups] == [(2, 0.1), (2, 0.0)]
    assert all("lr_mult" not in g for g in opt.param_groups)


def test_factors_split_the_groups_and_the_schedules_own_come_first():
    m = TwoPart()
    opt = make_optimizer(m, 1e-3, 0.1, (0.9, 0.95), "cpu", lr_mult=lambda n: 0.1 if n.startswith("vision.") else 1.0)
    got = [({id(p) for p in g["params"]}, g["weight_decay"], g["lr_mult"]) for g in opt.param_groups]
    assert got == [({id(m.lm.weight)}, 0.1, 1.0), ({id(m.lm.bias)}, 0.0, 1.0),
                   ({id(m.vision.weight)}, 0.1, 0.1), ({id(m.vision.bias)}, 0.0, 0.1)]
