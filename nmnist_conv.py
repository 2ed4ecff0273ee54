"""Train or evaluate the 64C5s feedback SNN (F64C5) on N-MNIST spike frames (B, 2, 34, 34, T), as in the paper."""
from utils.training.run import run


def main(argv=None):
    """Train (or with -e --resume FILE evaluate) nmnist_conv on N-MNIST."""
    return run('nmnist_conv', argv, __doc__)


if __name__ == '__main__':
    main()
