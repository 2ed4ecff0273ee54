"""Train or evaluate AlexNet-F, the multi-layer feedback SNN, on CIFAR-10/100, as in the paper."""
from utils.training.run import run


def main(argv=None):
    """Train (or with -e --resume FILE evaluate) alexnetf on CIFAR-10 or CIFAR-100."""
    return run('alexnetf', argv, __doc__)


if __name__ == '__main__':
    main()
