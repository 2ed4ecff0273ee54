"""Running averages and top-k accuracy."""
import torch


class AverageMeter:
    """Current value, sum, count and average of a quantity over a run of batches."""

    def __init__(self):
        """Start empty."""
        self.reset()

    def reset(self):
        """Forget every update."""
        self.val = 0.0
        self.avg = 0.0
        self.sum = 0.0
        self.count = 0

    def update(self, val, n=1):
        """Add val, the mean over n samples."""
        # float(): a tensor would keep its device and graph, and a log needs a plain number.
        self.val = float(val)
        self.sum += self.val * n
        self.count += n
        self.avg = self.sum / self.count


def accuracy(output, target, topk=(1,)):
    """Percentage of samples whose target is among the k highest outputs, one 0-d tensor per k."""
    with torch.no_grad():
        maxk = max(topk)
        _, pred = output.topk(maxk, dim=1, largest=True, sorted=True)
        correct = pred.eq(target.view(-1, 1))
        # float64: a mean over a batch, re-weighted by its size, must add up to the same accuracy
        # however the test set is split into batches or processes.
        return [correct[:, :k].any(dim=1).double().mean() * 100.0 for k in topk]
