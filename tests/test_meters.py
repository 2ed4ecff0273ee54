"""The running averages and top-k accuracy of utils/training/meters.py."""
import pytest
import torch

from utils.training.meters import AverageMeter, accuracy


def test_average_meter_weights_by_count():
    meter = AverageMeter()
    meter.update(torch.tensor(1.0), n=3)
    meter.update(3.0, n=1)
    assert (meter.val, meter.sum, meter.count, meter.avg) == (3.0, 6.0, 4, 1.5)


def test_accuracy_top1_top2():
    output = torch.tensor([[0.1, 0.7, 0.2], [0.5, 0.1, 0.4], [0.2, 0.3, 0.5], [0.6, 0.3, 0.1]])
    target = torch.tensor([1, 2, 0, 2])
    top1, top2 = accuracy(output, target, topk=(1, 2))
    assert top1.item() == pytest.approx(25.0) and top2.item() == pytest.approx(50.0)
