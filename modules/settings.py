"""The paper's settings for each of its five networks: the one table every script, tool and test reads.

`NETS[name]` gives a network's training script, the data sets it reads and the
paper's defaults for it (docs/method.md §5); `defaults(name)` merges them with the
settings every script shares (`COMMON`). The network's shape lives in
`modules.models.ARCHITECTURES`, under the same name.
"""
from dataclasses import dataclass

# The paper's settings shared by every training script; a net's entry in NETS overrides some.
COMMON = dict(
    path='./data', workers=4, time_step=30, vth=2.0, leaky=None, epochs=100, start_epoch=0,
    train_batch=128, test_batch=200, lr=0.05, warmup=0, drop=0.2, schedule=(30, 60, 90),
    gamma=0.1, momentum=0.9, weight_decay=5e-4, optimizer='SGD', solver='broyden', threshold=30, tol=None,
)


@dataclass(frozen=True)
class NetSettings:
    """One network's script, data sets (the first is the default) and the paper's settings for it."""
    script: str                 # the training script at the top level
    datasets: tuple
    time_step: int
    leaky: float                # the paper's LIF leak λ (its IF rows pass --leaky 1)
    schedule: tuple             # epochs at which the learning rate is multiplied by gamma
    warmup: int = 0             # iterations of linear learning-rate warm-up
    solver: str = 'broyden'     # adjoint solver

    @property
    def dataset(self):
        """The data set a run reads by default."""
        return self.datasets[0]


NETS = {
    'mnist_conv': NetSettings('mnist_conv.py', ('mnist', 'digits'), 30, 0.95, (30, 60, 90)),
    'fashion_mlp': NetSettings('fashion_mlp.py', ('fashionmnist', 'digits'), 5, 0.95, (30, 60, 90)),
    'nmnist_conv': NetSettings('nmnist_conv.py', ('nmnist',), 30, 0.95, (30, 60, 90), solver='iter'),
    'alexnetf': NetSettings('cifar_alexnetf.py', ('cifar10', 'cifar100'), 100, 0.99, (50, 75), warmup=400),
    'cifarnetf': NetSettings('cifar_cifarnetf.py', ('cifar10', 'cifar100'), 100, 0.99, (50, 75), warmup=400),
}


def defaults(name):
    """Every default flag value of network `name`'s training script, as a dict of flag names."""
    net = NETS[name]
    return {**COMMON, 'dataset': net.dataset, 'time_step': net.time_step, 'leaky': net.leaky,
            'schedule': list(net.schedule), 'warmup': net.warmup, 'solver': net.solver}

