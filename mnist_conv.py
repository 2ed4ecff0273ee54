"""Train or evaluate the 64C5s feedback SNN (F64C5) on MNIST, as in the paper.

Example (CPU, no download): python mnist_conv.py --dataset digits -j 0"""
from utils.train import run

ARCH = 'mnist_conv'
DATASETS = ('mnist', 'digits')
# The paper's settings for this network; the rest are shared (utils/cli.py).
DEFAULTS = dict(dataset='mnist', time_step=30, leaky=0.95, schedule=[30, 60, 90], warmup=0, solver='broyden')


def main(argv=None):
    """Train (or with -e --resume FILE evaluate) mnist_conv on MNIST (or scikit-learn digits)."""
    return run(ARCH, argv, __file__, DEFAULTS, DATASETS, __doc__)


if __name__ == '__main__':
    main()
