"""Train or evaluate CIFARNet-F, the wide multi-layer feedback SNN, on CIFAR-10/100, as in the paper."""
from utils.training.run import run


def main(argv=None):
    """Train (or with -e --resume FILE evaluate) cifarnetf on CIFAR-10 or CIFAR-100."""
    return run('cifarnetf', argv, __doc__)


if __name__ == '__main__':
    main()
