"""Train or evaluate AlexNet-F, the multi-layer feedback SNN, on CIFAR-10/100, as in the paper."""
from utils.train import run

ARCH = 'alexnetf'
DATASETS = ('cifar10', 'cifar100')
# The paper's settings for this network; the rest are shared (utils/cli.py).
DEFAULTS = dict(dataset='cifar10', time_step=100, leaky=0.99, schedule=[50, 75], warmup=400, solver='broyden')


def main(argv=None):
    """Train (or with -e --resume FILE evaluate) alexnetf on CIFAR-10 or CIFAR-100."""
    return run(ARCH, argv, __file__, DEFAULTS, DATASETS, __doc__)


if __name__ == '__main__':
    main()
