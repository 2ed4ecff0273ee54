"""Train or evaluate the 400-neuron fully connected feedback SNN (F400) on Fashion-MNIST, as in the paper."""
from utils.train import run

ARCH = 'fashion_mlp'
DATASETS = ('fashionmnist', 'digits')
# The paper's settings for this network; the rest are shared (utils/cli.py).
DEFAULTS = dict(dataset='fashionmnist', time_step=5, leaky=0.95, schedule=[30, 60, 90], warmup=0, solver='broyden')


def main(argv=None):
    """Train (or with -e --resume FILE evaluate) fashion_mlp on Fashion-MNIST (or scikit-learn digits)."""
    return run(ARCH, argv, __file__, DEFAULTS, DATASETS, __doc__)


if __name__ == '__main__':
    main()
