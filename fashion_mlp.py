"""Train or evaluate the 400-neuron fully connected feedback SNN (F400) on Fashion-MNIST, as in the paper."""
from utils.training.run import run


def main(argv=None):
    """Train (or with -e --resume FILE evaluate) fashion_mlp on Fashion-MNIST (or scikit-learn digits)."""
    return run('fashion_mlp', argv, __doc__)


if __name__ == '__main__':
    main()
