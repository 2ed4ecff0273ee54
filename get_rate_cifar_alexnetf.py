"""Firing rates of a trained AlexNet-F on CIFAR-10/100, with the flags of the paper's script.

    python get_rate_cifar_alexnetf.py --gpu-id 0 --dataset cifar10 --path ./data --time_step 30 \
        --leaky 0.99 --resume checkpoints/cifar10_alexnetf/model_best.pth.tar

Prints the test loss and accuracy, each spiking layer's average firing rate and
the neuron-weighted total, spikes, synaptic operations, MACs and energy per test
sample next to the ANN's, and writes them next to the checkpoint (see get_rate.py,
which does the same for every network).
"""
import sys

import get_rate


def main(argv=None):
    """Command-line entry point; returns the exit status."""
    return get_rate.main(argv, arch='alexnetf', prog='get_rate_cifar_alexnetf.py')


if __name__ == '__main__':
    sys.exit(main())
