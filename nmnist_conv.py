"""Train or evaluate the 64C5s feedback SNN (F64C5) on N-MNIST spike frames (B, 2, 34, 34, T), as in the paper."""
from utils.train import run

ARCH = 'nmnist_conv'
DATASETS = ('nmnist',)
# The paper's settings for this network; the rest are shared (utils/cli.py).
DEFAULTS = dict(dataset='nmnist', time_step=30, leaky=0.95, schedule=[30, 60, 90], warmup=0, solver='iter')


def main(argv=None):
    """Train (or with -e --resume FILE evaluate) nmnist_conv on N-MNIST."""
    return run(ARCH, argv, __file__, DEFAULTS, DATASETS, __doc__)


if __name__ == '__main__':
    main()
