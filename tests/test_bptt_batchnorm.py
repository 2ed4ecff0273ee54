"""BPTT's batch normalisation inside the feedback loop (modules/bptt.py, bn='batch' and 'running').

  (a) in 'batch' mode the running statistics move once per step, to those a torch BatchNorm
      would take from all T×B inputs the layer saw (collected by an independent loop);
  (b) from initialisation a deep paper net is silent under 'running' (no gradient reaches the
      classifier or the feedback), while under 'batch' every layer fires and both get one;
  (c) the modes agree exactly on a single-layer net, which has no BN inside the loop.
"""
import copy

import pytest
import torch

from modules import BPTT, build_model
from tests.test_bptt import LEAKS, TIME_STEP, naive_rate, paper_input, training_step, twin_models

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.mark.parametrize("leak", sorted(LEAKS))
def test_batch_mode_running_statistics_are_those_of_all_steps(tiny_snn, tiny_input, leak):
    """Each loop BN's running statistics after the step equal a torch BatchNorm's after one training
    call on the concatenation of the T steps' inputs; the input layer's move by F(x̄) as in IDE."""
    snn = tiny_snn("multi", leak=LEAKS[leak], time_step=TIME_STEP, dropout=0.25).train()
    snn.bptt = BPTT(bn="batch")
    x = tiny_input("multi", 3, False, TIME_STEP, seed=1, scale=2.0)
    before = copy.deepcopy(snn)
    snn(x)
    inputs = [[] for _ in snn.layers]
    with torch.no_grad():
        naive_rate(snn, x, None, "sigmoid", 4.0, loop_inputs=inputs)
    for layer, old, seen in zip(snn.layers, before.layers, inputs):
        assert len(seen) == TIME_STEP
        reference = old.bn.train()
        reference(torch.cat(seen))
        torch.testing.assert_close(layer.bn.running_mean, reference.running_mean, rtol=0, atol=1e-13)
        torch.testing.assert_close(layer.bn.running_var, reference.running_var, rtol=0, atol=1e-13)
        assert int(layer.bn.num_batches_tracked) == int(reference.num_batches_tracked) == 1
    ide_input = before.input_layer.train()
    ide_input(x, update_stats=True)
    torch.testing.assert_close(snn.input_layer.bn.running_mean, ide_input.bn.running_mean, rtol=0, atol=0)


@pytest.mark.parametrize("name", ("alexnetf", "cifarnetf"))
def test_deep_net_fires_and_learns_only_with_batch_statistics(name):
    """At initialisation (running mean 0, variance 1) the last layers are silent under 'running': the
    classifier and the feedback get an exactly zero gradient. Under 'batch' every layer fires and both get one."""
    time_step = 3
    for bn in ("running", "batch"):
        torch.manual_seed(0)
        model = build_model(name, time_step=time_step, leaky=0.95, method="bptt", bptt_bn=bn).train()
        x = paper_input(model, 4, time_step)
        training_step(model, x, torch.tensor([1, 2, 3, 4]))
        rates = [float(r.mean()) for r in model.snn.bptt.layer_rates(model.snn, x)]
        feedback = model.snn.feedback.linear.parametrizations.weight.original.grad
        reached = float(model.classifier.weight.grad.abs().sum()), float(feedback.abs().sum())
        if bn == "running":
            assert rates[-1] == 0.0 and reached == (0.0, 0.0), (rates, reached)
        else:
            assert min(rates) > 0.0 and min(reached) > 0.0, (rates, reached)


def test_single_layer_net_is_the_same_in_both_modes():
    """No BN inside the loop: 'batch' and 'running' give the same output, gradients and buffers."""
    time_step = 3
    _, running = twin_models("mnist_conv", time_step, bptt_bn="running")
    _, batch = twin_models("mnist_conv", time_step, bptt_bn="batch")
    x, target = paper_input(running, 2, time_step), torch.tensor([3, 7])
    assert torch.equal(training_step(running, x, target), training_step(batch, x, target))
    for (key, a), b in zip(running.named_parameters(), batch.parameters()):
        assert torch.equal(a.grad, b.grad), key
    for (key, a), b in zip(running.state_dict().items(), batch.state_dict().values()):
        assert torch.equal(a, b), key



def test_a_run_saved_before_the_flag_resumes_with_running_statistics():
    """A checkpoint's flags without bptt_bn come from a run that normalised by running statistics."""
    from argparse import Namespace
    from utils.flags import adopt_saved_flags
    args = Namespace(bptt_bn="batch", method="ide")
    taken, _ = adopt_saved_flags(args, set(), {"method": "bptt"})
    assert (args.bptt_bn, args.method) == ("running", "bptt") and taken["bptt_bn"] == ("batch", "running")
    args = Namespace(bptt_bn="batch")
    adopt_saved_flags(args, set(), {"bptt_bn": "batch"})
    assert args.bptt_bn == "batch"
