"""Train or evaluate the 64C5s feedback SNN (F64C5) on MNIST, as in the paper.

Example (CPU, no download): python mnist_conv.py --dataset digits -j 0"""
from utils.training.run import run


def main(argv=None):
    """Train (or with -e --resume FILE evaluate) mnist_conv on MNIST (or scikit-learn digits)."""
    return run('mnist_conv', argv, __doc__)


if __name__ == '__main__':
    main()
